"""Several GPUs on one host: pytest-xdist worker gwN runs on GPU N mod the GPU count; one GPU, or
no xdist, keeps the plain device (so single-GPU reports read `cuda` as before)."""
import pytest
import torch

from conformance.matrix import default_device


@pytest.mark.parametrize("worker, gpus, device", [("gw0", 2, "cuda:0"), ("gw3", 2, "cuda:1"), ("gw5", 4, "cuda:1"),
                                                  ("gw3", 1, "cuda"), ("", 2, "cuda")])
def test_xdist_workers_spread_over_the_gpus(monkeypatch, worker, gpus, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    assert str(default_device()) == device
    assert str(default_device("cuda:0")) == "cuda:0"  # --device wins
