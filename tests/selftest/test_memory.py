"""GPU memory admission: the ledger that processes sharing a GPU claim its memory through, and the
estimate each case is admitted with. The ledger is plain files and process ids, so it is tested on
CPU; on a GPU the conformance runs exercise it (their reports record estimate and peak per case)."""
import os
import threading
import time

import torch

from conformance.fixtures import CATALOG
from conformance.memory import GiB, DeviceMemory, _ledger, shrink_local_memory
from conformance.modes import case_bytes


def _two(tmp_path, budget=10 * GiB, free=lambda: 100 * GiB, stall=1.5):
    path = tmp_path / "gpu.ledger"
    # two live processes: this one and its parent
    return path, DeviceMemory(path, budget, free, stall_seconds=stall), DeviceMemory(
        path, budget, free, pid=os.getppid(), stall_seconds=stall)


def test_a_big_case_waits_while_another_runs_one_and_not_for_idle_claims(tmp_path):
    path, a, b = _two(tmp_path)
    a.admit(7 * GiB)  # a runs a big case
    b.admit(GiB)  # a small case never waits
    waits = []
    waiter = threading.Thread(target=b.admit, args=(5 * GiB, lambda: waits.append(1)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and waits == [1]  # 7 + 5 GiB > 10 while a's case runs; it said so, once
    a.settle(4 * GiB)  # a's case ended; it still holds 4 GiB of prepared inputs, but runs nothing
    waiter.join(5)
    assert not waiter.is_alive()
    with _ledger(path) as claims:
        assert claims == {os.getpid(): (4 * GiB, False), os.getppid(): (5 * GiB, True)}


def test_a_claim_past_the_budget_runs_when_nothing_else_will_be_freed(tmp_path):
    path, a, b = _two(tmp_path)
    a.settle(8 * GiB)
    b.admit(20 * GiB)  # nothing runs beside it: waiting would wait forever
    assert b.claim == (20 * GiB, True)


def test_a_big_case_also_waits_for_what_the_gpu_really_has_free(tmp_path):
    """Memory no claim knows of (CUDA contexts, another program, a spilling kernel's local memory):
    the budget would let the case in, the GPU's free memory does not while another case runs."""
    free = [6 * GiB]
    path, a, b = _two(tmp_path, budget=100 * GiB, free=lambda: free[0])
    a.admit(3 * GiB)
    waiter = threading.Thread(target=b.admit, args=(4 * GiB,))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()  # 3 GiB running beside it + 4 > 6 free
    free[0] = 8 * GiB
    waiter.join(5)
    assert not waiter.is_alive() and b.claim == (4 * GiB, True)
    b.settle(0)
    assert a.admit(8 * GiB) is False  # nothing else runs and the GPU has it free: no wait


def test_a_big_case_waits_for_the_memory_idle_processes_hold_until_the_ledger_stalls(tmp_path):
    """32 workers on one H200 between cases held the GPU full, none of them running a big case;
    one let in past them ran out of memory. It waits for their memory instead, while their claims
    change (they move on to other cases); when nothing changes any more, it goes ahead."""
    free = [3 * GiB]
    path, a, b = _two(tmp_path, budget=100 * GiB, free=lambda: free[0])
    a.settle(6 * GiB)  # a prepared case, idle
    waiter = threading.Thread(target=b.admit, args=(4 * GiB,))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # nothing runs, but 4 GiB > 3 free
    free[0] = 5 * GiB
    a.settle(4 * GiB)  # a moved on and gave back 2 GiB
    waiter.join(1)
    assert not waiter.is_alive() and b.claim == (4 * GiB, True)
    b.settle(0)
    t0 = time.monotonic()
    assert a.admit(50 * GiB) is True  # more than the GPU has free, and nothing will change: after the stall
    assert 1.5 <= time.monotonic() - t0 < 5


def test_a_busy_gpu_is_no_stall_though_no_claim_changes(tmp_path):
    """Other processes running small cases under their idle claims change no claim, but their memory
    comes and goes: a big case that does not fit waits on while it does, and goes ahead once it stops."""
    free, busy = [3 * GiB], [True]
    path, a, b = _two(tmp_path, budget=100 * GiB, free=lambda: free[0])
    a.settle(6 * GiB)

    def others_at_work():
        while busy[0]:
            free[0] = 3 * GiB if free[0] != 3 * GiB else 5 * GiB
            time.sleep(0.3)

    worker = threading.Thread(target=others_at_work, daemon=True)
    worker.start()
    waiter = threading.Thread(target=b.admit, args=(8 * GiB,), daemon=True)
    waiter.start()
    time.sleep(3.0)  # twice the stall time, unchanged claims
    still_waiting = waiter.is_alive()
    busy[0] = False
    worker.join()
    assert still_waiting
    waiter.join(5)
    assert not waiter.is_alive() and b.claim == (8 * GiB, True)


def test_local_memory_a_spilling_kernel_left_is_given_back():
    """The CUDA driver API faked: the stack limit is set back to the default only when it grew."""
    class Driver:
        def __init__(self, stack):
            self.stack, self.set_to = stack, None

        def cuCtxGetLimit(self, out, limit):
            out._obj.value = self.stack  # byref(c_size_t)
            return 0

        def cuCtxSetLimit(self, limit, value):
            self.set_to = value.value
            return 0

    grown, default = Driver(21968), Driver(1024)
    assert shrink_local_memory(grown) and grown.set_to == 1024
    assert not shrink_local_memory(default) and default.set_to is None


def test_claims_of_dead_processes_are_dropped(tmp_path):
    path, a, _ = _two(tmp_path)
    with _ledger(path) as claims:
        claims[2**22 + 12345] = (100 * GiB, True)  # no such process (pid_max is at most 2^22)
    a.admit(8 * GiB)
    with _ledger(path) as claims:
        assert claims == {os.getpid(): (8 * GiB, True)}


def test_estimate_grows_with_the_cache_and_covers_it_three_times():
    specs = {s.id: s for s in CATALOG.cases("cpu", ["medium_decode"], kind="mha")}
    small = specs["medium_decode-fp16-bs16-gqa4-d128"]
    fp32 = specs["medium_decode-fp32-bs16-gqa4-d128"]
    fp8 = specs["medium_decode-fp16-bs16-gqa4-d128-kvfp8e4m3"]
    cache = small.pool_blocks * small.block_size * small.heads.cache_elements_per_token * 2
    assert case_bytes(small) > 4 * cache
    assert case_bytes(fp8) < case_bytes(small) < case_bytes(fp32)
    far = small.replace(far_pages=True)
    assert case_bytes(far) > 2**31 * 2 * 2 * 4  # a K and a V cache of >= 2^31 fp16 elements, and copies
    mla = next(s for s in CATALOG.cases("cpu", ["small_decode"], kind="mla") if s.dtype == torch.float16)
    assert case_bytes(mla) > mla.pool_blocks * mla.block_size * 576 * 2


def test_a_case_bigger_than_the_gpu_is_a_skip_saying_how_much(monkeypatch):
    """Decided before anything runs, from the estimate and the GPU's size (faked here: 8 GiB)."""
    from types import SimpleNamespace

    from conformance import Backend, Status
    from conformance.runner import refusal

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=8 * GiB))
    spec = CATALOG.cases("cpu", ["small_decode"], kind="mha")[0]
    cuda = torch.device("cuda")
    assert refusal(Backend(), spec, cuda) is None
    verdict = refusal(Backend(), spec.replace(far_pages=True), cuda)
    assert verdict.status == Status.SKIP and verdict.reason.startswith("needs about ")
    assert verdict.reason.endswith("the GPU has 8.0 GiB")


def test_the_runner_claims_a_big_case_while_it_runs_and_settles_after(tmp_path, monkeypatch):
    """The runner's CUDA path, on CPU: torch.cuda's memory counters faked, the ledger real."""
    import conformance.runner as runner_module
    from conformance import Runner, Status
    from conformance.memory import IDLE_CLAIM
    from mutants import PagedTorch

    seen = []

    class Recording(PagedTorch):
        def run(self, case):
            seen.append(runner.memory.claim)
            return super().run(case)

    for name, value in (("reset_peak_memory_stats", None), ("max_memory_allocated", 3 * GiB),
                        ("memory_reserved", 0), ("memory_allocated", GiB), ("empty_cache", None)):
        monkeypatch.setattr(torch.cuda, name, lambda *a, v=value: v)
    big = CATALOG.cases("cpu", ["small_decode"], kind="mha")[0]
    monkeypatch.setattr(runner_module, "case_bytes", lambda spec, copies=4.0: 6 * GiB if spec == big else GiB)
    shrunk = []
    monkeypatch.setattr(runner_module, "shrink_local_memory", lambda: shrunk.append(True))
    runner = Runner("cpu")
    runner.memory = DeviceMemory(tmp_path / "gpu.ledger", 10 * GiB, lambda: 10 * GiB)
    result = runner.run(Recording(), big)
    assert result.status == Status.PASS and (result.memory_estimate, result.memory_peak) == (6 * GiB, 3 * GiB)
    assert seen == [(6 * GiB, True)] and runner.memory.claim == (IDLE_CLAIM, False)
    assert shrunk == [True]  # after the case: a spilling kernel's local memory back to the GPU
    held_at_admission = []
    admit = runner.memory.admit
    monkeypatch.setattr(runner.memory, "admit",
                        lambda need, *a: held_at_admission.append(list(runner.cases)) or admit(need, *a))
    runner.run(PagedTorch(), CATALOG.cases("cpu", ["small_decode"], kind="mha")[1])
    assert held_at_admission == [[]]  # the big case it kept was dropped before it asked for memory

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    import conformance.modes.one

    monkeypatch.setattr(conformance.modes.one, "judge_output", out_of_memory)  # judging needs memory too
    result = runner.run(PagedTorch(), big)
    assert result.status == Status.ERROR and result.reason.startswith("the case does not fit in memory here")
    assert result.categories == (runner_module.Category.OUT_OF_MEMORY,)
    assert runner.memory.claim == (IDLE_CLAIM, False)
