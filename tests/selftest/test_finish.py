"""Every Result is finished one way (runner.finish): those the isolated runner makes itself (a crash,
a timeout, a worker that cannot be reached or does not start, a skip) carry the adapter's known
failure and a probe's declaration as the in-process Runner's do, so a listed crash is an XFAIL and a
probe's crash a refusal, not failures."""
import dataclasses
import datetime

import crashers
import pytest
import torch

from conformance import Backend, Capabilities, KnownFailure, Runner, Status
from conformance.fixtures import CATALOG
from conformance.fixtures.pytest_plugin import check
from conformance.isolation import IsolatedRunner
from conformance.probe import Probe

CASES = {c.id: c for c in CATALOG.cases("cpu", ["small_decode"], kind="mha")}
FP32, FP16 = CASES["small_decode-fp32-bs16-gqa4-d128"], CASES["small_decode-fp16-bs16-gqa4-d128"]
HANG_TIMEOUT = 4.0
LISTED = KnownFailure(cases="small_decode-*", reason="takes its process down",
                      link="https://github.com/example/kernels/issues/9",
                      expires=(datetime.date.today() + datetime.timedelta(days=30)).isoformat())


def listed(backend: Backend) -> Backend:
    backend.known_failures = (LISTED,)  # an instance attribute: it travels pickled with the backend
    return backend


def outcome(result) -> str:
    """What the pytest plugin's check() makes of a result: "pass", "skip", "xfail" or "fail"."""
    try:
        check(result)
    except pytest.xfail.Exception:  # before fail: XFailed is a Failed
        return "xfail"
    except pytest.fail.Exception:
        return "fail"
    except pytest.skip.Exception:
        return "skip"
    return "pass"


def assert_xfail(result, status: Status) -> None:
    assert result.status is status, result.reason
    assert result.known_failure == dataclasses.asdict(LISTED)
    assert outcome(result) == "xfail"
    assert outcome(dataclasses.replace(result, known_failure=None)) == "fail"  # unlisted (the bug): a failure


@pytest.mark.parametrize("crasher, status, timeout", [(crashers.Aborts, Status.CRASH, 60),
                                                      (crashers.Segfaults, Status.CRASH, 60),
                                                      (crashers.Hangs, Status.TIMEOUT, HANG_TIMEOUT)])
def test_a_listed_crash_or_hang_is_an_xfail(crasher, status, timeout):
    # A crash gets time to spare: a fresh worker prepares the case inside the timeout, slow on a loaded machine.
    with IsolatedRunner("cpu", timeout=timeout) as runner:
        assert_xfail(runner.run(listed(crasher()), FP32), status)


def test_a_listed_backend_that_cannot_reach_the_worker_is_an_xfail():
    class Local(Backend):  # defined in a function: pickle cannot name it
        name, capabilities = "finish-local", Capabilities(dtypes=frozenset({torch.float16}))
        known_failures = (LISTED,)

    with IsolatedRunner("cpu") as runner:
        result = runner.run(Local(), FP16)
        assert runner.worker_pid is None
    assert result.reason.startswith("finish-local could not be sent to the worker process")
    assert_xfail(result, Status.ERROR)


def test_a_listed_case_whose_worker_does_not_start_is_an_xfail():
    with IsolatedRunner("cpu", start_timeout=0.001) as runner:  # no worker imports torch that fast
        result = runner.run(listed(crashers.Works()), FP32)
    assert result.reason.startswith("the worker process did not start within"), result.reason
    assert_xfail(result, Status.ERROR)


def test_a_probe_that_crashes_is_a_refusal_as_declared():
    probe = Probe(crashers.AbortsDeclaringFp16Only())
    with IsolatedRunner("cpu", timeout=60) as runner:
        result = runner.run(probe, FP32)
    assert result.status is Status.CRASH and "dtype fp32 not supported" in result.probe
    assert outcome(result) == "skip"
    assert outcome(dataclasses.replace(result, probe=None)) == "fail"  # not known as a probe (the bug): a failure


@pytest.mark.parametrize("backend", [listed(crashers.IllegalAccess()), Probe(listed(crashers.IllegalAccess()))],
                         ids=["skip", "probe-skip"])
def test_a_skip_before_sending_is_finished_as_in_process(backend):
    with IsolatedRunner("cpu") as runner:
        isolated = runner.run(backend, FP32)  # cuda only: skipped in the parent
        assert runner.worker_pid is None
    in_process = Runner("cpu").run(backend, FP32)
    assert isolated.status is in_process.status is Status.SKIP
    assert (isolated.known_failure, isolated.probe) == (in_process.known_failure, in_process.probe)
    assert isolated.known_failure or isolated.probe  # the backend's listed failure, or the probe's declaration
    assert outcome(isolated) == "skip"  # a skip is no known failure's outcome
