"""The xdist scheduler (fixtures/scheduling.py): whole cases to one worker, the longest first, big
cases only while they fit beside the others', and nothing lost when a worker dies."""
from types import SimpleNamespace

import pytest

pytest.importorskip("xdist")

from conformance.fixtures.scheduling import CaseScheduling, Unit  # noqa: E402

GiB = 1 << 30


class FakeNode:
    """A worker as the scheduler sees it: what it was sent, and whether it was told to stop."""

    def __init__(self, name: str):
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, tests):
        self.sent.extend(tests)

    def shutdown(self):
        self.shutting_down = True


def scheduler(units: list[Unit], nodes: int = 2, budget: float = float("inf"), gpus: int = 1):
    config = SimpleNamespace(getoption=lambda name: None, getvalue=lambda name: None,
                             option=SimpleNamespace(numprocesses=nodes, tx=[], dist="load"))
    config.getini = lambda name: []
    sched = CaseScheduling.__new__(CaseScheduling)  # without xdist's config parsing
    sched.numnodes, sched.node2collection, sched.node2pending, sched.pending = nodes, {}, {}, []
    sched.collection, sched.log, sched.config, sched.maxschedchunk = None, lambda *a: None, config, None
    sched.units_of, sched.budget, sched.gpus, sched.unit, sched.left = (lambda c: units), budget, gpus, [], {}
    workers = [FakeNode(f"gw{i}") for i in range(nodes)]
    collection = [f"t{i}" for i in range(len(units))]
    for w in workers:
        sched.add_node(w)
        sched.add_node_collection(w, collection)
    return sched, workers


def finish(sched, node, n: int = 1):
    for _ in range(n):
        sched.mark_test_complete(node, sched.node2pending[node][0])


def test_a_case_goes_to_one_worker_whole_and_the_longest_first():
    # tests 0-2: case a (cheap); 3-5: case b (costly); 6: a self-test, which goes first
    units = [Unit("a", 1.0, 0)] * 3 + [Unit("b", 9.0, 0)] * 3 + [Unit("t6", float("inf"), 0)]
    sched, (w0, w1) = scheduler(units)
    sched.schedule()
    assert w0.sent == [6, 3, 4, 5, 0, 1, 2] and w1.sent == []  # up to TOP_UP tests, units whole, in order
    assert w0.shutting_down and w1.shutting_down and not sched.pending


def test_a_big_case_waits_for_room_while_the_worker_takes_a_small_one():
    units = [Unit("big1", 9.0, 60 * GiB)] * 10 + [Unit("big2", 8.0, 60 * GiB)] * 10 + [Unit("small", 1.0, 0)] * 10
    sched, (w0, w1) = scheduler(units, budget=100 * GiB)
    sched.schedule()
    assert w0.sent == list(range(10))  # big1
    assert w1.sent == list(range(20, 30))  # big2 does not fit beside big1: the small case instead
    finish(sched, w1, 3)
    assert w1.sent == list(range(20, 30))  # it still has work: nothing else is sent while big2 cannot fit
    finish(sched, w1, 6)  # about to run dry (one test left) and nothing fits: big2 anyway, the ledger waits
    assert w1.sent == list(range(20, 30)) + list(range(10, 20))


def test_a_finished_big_case_makes_room_for_the_next():
    units = [Unit("big1", 9.0, 60 * GiB)] * 10 + [Unit("big2", 8.0, 60 * GiB)] * 10 + [Unit("small", 1.0, 0)] * 10
    sched, (w0, w1) = scheduler(units, budget=100 * GiB)
    sched.schedule()
    finish(sched, w0, 10)  # big1 done: w0 takes big2, which fits now
    assert w0.sent == list(range(20))


def test_workers_on_other_gpus_do_not_share_memory():
    units = [Unit("big1", 9.0, 60 * GiB)] * 10 + [Unit("big2", 8.0, 60 * GiB)] * 10
    sched, (w0, w1) = scheduler(units, budget=100 * GiB, gpus=2)
    sched.schedule()
    assert w0.sent == list(range(10)) and w1.sent == list(range(10, 20))


def test_a_dead_workers_queue_is_sent_again():
    units = [Unit(key, cost, 0) for key, cost in zip("abcdef", (6, 5, 4, 3, 2, 1)) for _ in range(4)]
    sched, (w0, w1) = scheduler(units)
    sched.schedule()
    assert w0.sent == list(range(8)) and w1.sent == list(range(8, 16))
    assert sched.remove_node(w0) == "t0"  # the crash; its tests 1-7 go back before e and f, units whole
    assert sched.pending == [1, 2, 3, 4, 5, 6, 7, *range(16, 24)]
    finish(sched, w1, 8)
    assert w1.sent == [*range(8, 16), 1, 2, 3, 4, 5, 6, 7, *range(16, 20)]  # up to its top-up
