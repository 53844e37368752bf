"""Isolated runs: a backend that segfaults, aborts or hangs is a CRASH or TIMEOUT for its case and
the run goes on in a fresh worker; everything else gives the in-process Runner's very Result."""
import time

import crashers
import pytest
import torch

from conformance import Backend, Capabilities, Runner, Status, get_backend
from conformance.isolation import IsolatedRunner
from conformance.fixtures import CATALOG

CASES = {c.id: c for c in CATALOG.cases("cpu", ["small_decode"], kind="mha")}
FP32, FP16 = CASES["small_decode-fp32-bs16-gqa4-d128"], CASES["small_decode-fp16-bs16-gqa4-d128"]
HANG_TIMEOUT = 4.0


def test_crashes_and_hangs_are_results_and_the_run_goes_on():
    good = get_backend("sdpa")  # registered: travels by name
    steps = [(good, Status.PASS), (crashers.Aborts(), Status.CRASH), (good, Status.PASS),
             (crashers.Hangs(), Status.TIMEOUT), (good, Status.PASS), (crashers.Segfaults(), Status.CRASH),
             (crashers.Works(), Status.PASS)]
    with IsolatedRunner("cpu", timeout=HANG_TIMEOUT) as runner:
        pids, seconds = [], []
        for backend, _ in steps:
            t0 = time.monotonic()
            runner.run(backend, FP32)
            seconds.append(time.monotonic() - t0)
            pids.append(runner.worker_pid)
    results = runner.results
    assert [r.status for r in results] == [want for _, want in steps], [(r.id, r.reason) for r in results]
    assert [r.backend for r in results] == [b.name for b, _ in steps]
    assert "SIGABRT (exit code -6)" in results[1].reason and "SIGSEGV (exit code -11)" in results[5].reason
    assert "worker process died during the case" in results[1].reason
    assert "Segmentation fault" in results[5].reason  # the worker's stderr tail (faulthandler's report)
    assert results[3].reason.startswith(f"no result within {HANG_TIMEOUT:g}s: the worker was killed")
    assert seconds[3] < HANG_TIMEOUT + 3
    # Each crash or timeout retires its worker: the next case runs in a fresh one.
    assert pids[1] is None and pids[3] is None and pids[5] is None
    assert len({pids[0], pids[2], pids[4], pids[6]}) == 4
    assert runner.worker_pid is None  # closed


def test_an_exception_is_an_error_and_the_worker_survives():
    with IsolatedRunner("cpu", timeout=60) as runner:
        first = runner.run(crashers.Raises(), FP32)
        pid = runner.worker_pid
        second = runner.run(get_backend("sdpa"), FP32)
        assert runner.worker_pid == pid
    assert first.status is Status.ERROR and "RuntimeError: an ordinary adapter bug" in first.reason
    assert second.status is Status.PASS


def test_isolated_results_are_the_in_process_results():
    pairs = [(get_backend("sdpa"), FP32), (crashers.Works(), FP32), (get_backend("sdpa"), FP16),
             (crashers.Works(), FP16)]
    in_process = Runner("cpu", base_seed=7)
    with IsolatedRunner("cpu", base_seed=7, timeout=60) as isolated:
        for backend, spec in pairs:
            want, got = in_process.run(backend, spec), isolated.run(backend, spec)
            fields = ("backend", "case", "device", "status", "reason", "err", "ref_err", "tol", "ratio", "seed")
            assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
            assert got.status is Status.PASS and got.backend_seconds is not None
    assert len(isolated.results) == len(pairs)


def test_skips_and_unsendable_backends_start_no_worker():
    class Local(Backend):  # defined in a function: pickle cannot name it
        name, capabilities = "isolation-local", Capabilities(dtypes=frozenset({torch.float16}))

    with IsolatedRunner("cpu") as runner:
        skipped = runner.run(crashers.IllegalAccess(), FP32)  # cuda only
        wrong_dtype = runner.run(Local(), FP32)
        unsendable = runner.run(Local(), FP16)
        assert runner.worker_pid is None
    assert skipped.status is Status.SKIP and skipped.reason.startswith("device cpu not supported")
    assert wrong_dtype.status is Status.SKIP and "dtype fp32" in wrong_dtype.reason
    assert unsendable.status is Status.ERROR
    assert unsendable.reason.startswith("isolation-local could not be sent to the worker process: ")
    assert [r.status for r in runner.results] == [Status.SKIP, Status.SKIP, Status.ERROR]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: an illegal memory access is a GPU fault")
def test_an_illegal_memory_access_is_a_crash_and_the_next_case_gets_a_fresh_context():
    with IsolatedRunner("cuda", timeout=300) as runner:
        before = runner.run(get_backend("sdpa"), FP32)
        pid = runner.worker_pid
        bad = runner.run(crashers.IllegalAccess(), FP32)
        after = runner.run(get_backend("sdpa"), FP32)
        assert runner.worker_pid not in (None, pid)
    assert before.status is Status.PASS and after.status is Status.PASS
    assert bad.status is Status.CRASH and bad.reason.startswith("CUDA context lost: "), bad.reason
