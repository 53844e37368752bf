"""GPU memory admission: the ledger that processes sharing a GPU claim its memory through, and the
estimate each case is admitted with. The ledger is plain files and process ids, so it is tested on
CPU; on a GPU the conformance runs exercise it (their reports record estimate and peak per case)."""
import os
import threading
import time

import torch

from conformance.matrix import select_cases
from conformance.memory import GiB, IDLE_CLAIM, DeviceMemory, _ledger, case_bytes


def _two(tmp_path, budget=10 * GiB):
    path = tmp_path / "gpu.ledger"
    return path, DeviceMemory(path, budget), DeviceMemory(path, budget, pid=os.getppid())  # two live processes


def test_a_big_claim_waits_until_the_other_gives_its_big_claim_back(tmp_path):
    path, a, b = _two(tmp_path)
    a.hold(7 * GiB)
    b.hold(0)  # the idle claim never waits
    waiter = threading.Thread(target=b.hold, args=(5 * GiB,))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()  # 7 + 5 GiB > 10
    a.hold(0)
    waiter.join(5)
    assert not waiter.is_alive()
    with _ledger(path) as claims:
        assert claims == {os.getpid(): IDLE_CLAIM, os.getppid(): 5 * GiB}


def test_a_claim_past_the_budget_runs_when_nothing_else_will_be_freed(tmp_path):
    path, a, b = _two(tmp_path)
    a.hold(0)
    b.hold(20 * GiB)  # only idle claims beside it: waiting would wait forever
    assert b.claimed == 20 * GiB


def test_claims_of_dead_processes_are_dropped(tmp_path):
    path, a, _ = _two(tmp_path)
    with _ledger(path) as claims:
        claims[2**22 + 12345] = 100 * GiB  # no such process (pid_max is at most 2^22)
    a.hold(8 * GiB)
    with _ledger(path) as claims:
        assert claims == {os.getpid(): 8 * GiB}


def test_estimate_grows_with_the_cache_and_covers_it_three_times():
    specs = {s.id: s for s in select_cases("cpu", ["medium_decode"], kind="mha")}
    small = specs["medium_decode-fp16-bs16-gqa4-d128"]
    fp32 = specs["medium_decode-fp32-bs16-gqa4-d128"]
    fp8 = specs["medium_decode-fp16-bs16-gqa4-d128-kvfp8e4m3"]
    cache = small.pool_blocks * small.block_size * small.heads.cache_elements_per_token * 2
    assert case_bytes(small) > 4 * cache
    assert case_bytes(fp8) < case_bytes(small) < case_bytes(fp32)
    far = small.replace(far_pages=True)
    assert case_bytes(far) > 2**31 * 2 * 2 * 4  # a K and a V cache of >= 2^31 fp16 elements, and copies
    mla = next(s for s in select_cases("cpu", ["small_decode"], kind="mla") if s.dtype == torch.float16)
    assert case_bytes(mla) > mla.pool_blocks * mla.block_size * 576 * 2


def test_a_case_bigger_than_the_gpu_is_a_skip_saying_how_much(monkeypatch):
    """Decided before anything runs, from the estimate and the GPU's size (faked here: 8 GiB)."""
    from types import SimpleNamespace

    from conformance import Backend, Status
    from conformance.runner import blank_result, settled_before_run

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=8 * GiB))
    spec = select_cases("cpu", ["small_decode"], kind="mha")[0]
    cuda = torch.device("cuda")
    for case, fits in ((spec, True), (spec.replace(far_pages=True), False)):
        result = blank_result("any", case, cuda, 0)
        assert settled_before_run(result, Backend(), case) is not fits
    assert result.status == Status.SKIP and result.reason.startswith("needs about ")
    assert result.reason.endswith("the GPU has 8.0 GiB")
