"""Where a run's time goes (conformance/costs.py): exclusive phases that add up to the run, each
attributed to the phase it was spent in, and the report's account of them."""
import time

import torch

from conformance import Backend, Capabilities, Case, gather_kv, scatter_to_cache
from conformance.costs import PHASES, Stopwatch, phase, timing
from conformance.fixtures import CATALOG
from conformance.report import format_cost, memory_accuracy
from conformance.result import Result, Status
from conformance.runner import Runner

SPEC = CATALOG.cases("cpu", ["small_decode"], kind="mha")[0]


def test_phases_are_exclusive_and_add_up_to_the_wall():
    watch = Stopwatch()
    start = time.perf_counter()
    with watch.phase("backend"):
        time.sleep(0.05)
        with watch.phase("inputs"):  # a fresh cache made inside the backend's calls is inputs
            time.sleep(0.05)
    time.sleep(0.02)  # outside every phase: judging
    fields = watch.fields()
    wall = time.perf_counter() - start
    assert 0.05 <= fields["backend_seconds"] < 0.09 and 0.05 <= fields["inputs_seconds"] < 0.09
    assert fields["judge_seconds"] >= 0.02
    assert abs(sum(fields[f"{name}_seconds"] for name in PHASES) - wall) < 0.01
    assert fields["harness_seconds"] == fields["inputs_seconds"] + fields["reference_seconds"] + fields["judge_seconds"]


def test_outside_a_run_nothing_is_timed():
    with phase("backend"):  # a warm-up, or a library using the suite's helpers: no error, no record
        pass
    with timing() as watch:
        pass
    assert watch.fields()["backend_seconds"] == 0.0


class Sleepy(Backend):
    """Correct, but slow in its call, and compiling on its first: the time must land in `backend`."""

    name = "sleepy"
    capabilities = Capabilities(features=frozenset({"causal", "non_causal"}))

    def run(self, case: Case):
        time.sleep(0.3)
        torch.compile(lambda x: x * 2, backend="eager")(torch.ones(3))  # dynamo's frame compile
        scatter_to_cache(case)
        k, v, starts = gather_kv(case)
        group, qsl = case.spec.heads.group_size, case.query_start_loc.tolist()
        for b, (s, e) in enumerate(zip(qsl[:-1], qsl[1:])):
            q = case.q[s:e].float().transpose(0, 1)
            kb = k[starts[b]:starts[b + 1]].float().transpose(0, 1).repeat_interleave(group, 0)
            vb = v[starts[b]:starts[b + 1]].float().transpose(0, 1).repeat_interleave(group, 0)
            scores = (q @ kb.transpose(1, 2)) * case.scale
            n, m = scores.shape[-2:]
            scores.masked_fill_(torch.ones(n, m, dtype=torch.bool).tril(m - n).logical_not(), float("-inf"))
            case.out[s:e] = (scores.softmax(-1) @ vb).transpose(0, 1).to(case.out.dtype)
        return case.out


def test_a_slow_backend_is_seen_as_the_backend_and_its_compile_as_compiling():
    result = Runner("cpu").run(Sleepy(), SPEC)
    assert result.status == Status.PASS, result.reason
    assert result.backend_seconds >= 0.3 > result.harness_seconds
    assert 0 < result.compile_seconds <= result.backend_seconds
    assert result.inputs_seconds > 0 and result.reference_seconds > 0 and result.judge_seconds > 0


def _result(name: str, seconds: float, estimate: int | None = None, peak: int | None = None) -> Result:
    return Result(backend=name, case="c", scenario="s", dtype="bf16", block_size=16, heads="h", device="cuda",
                  status=Status.PASS, backend_seconds=seconds, harness_seconds=0.01, inputs_seconds=0.0,
                  reference_seconds=0.01, judge_seconds=0.0, wait_seconds=1.0, compile_seconds=0.0,
                  memory_estimate=estimate, memory_peak=peak)


def test_the_report_names_the_longest_pairs_and_the_estimates_under_their_peak():
    GiB = 1 << 30
    results = [_result("fast", 0.1, 4 * GiB, 2 * GiB), _result("slow", 9.0, 2 * GiB, 3 * GiB)]
    text = format_cost(results)
    longest = text.split("The 2 longest pairs by wall")[1]
    assert longest.index("| slow-c | 10.0 |") < longest.index("| fast-c | 1.1 |")  # wall = wait + cost
    assert "| waiting for GPU memory | 2.0 |" in text
    accuracy = memory_accuracy(results)
    assert "over 2 pairs" in accuracy and "1 under their peak (the least: slow-c, 2.0 GiB for a peak of 3.0" in accuracy
