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


def test_run_spreads_cases_over_runners_and_keeps_pair_order():
    """`run` with one runner a GPU: the same results, in the same order, as with one runner (here two
    CPU runners stand in for two GPUs)."""
    from conformance import Runner, get_backend
    from conformance.cli import _run_pairs
    from conformance.fixtures import CATALOG

    specs = [s for s in CATALOG.cases("quick", ["small_decode", "mixed_small"]) if s.kind == "mha"][:6]
    pairs = [(get_backend(name), spec) for spec in specs for name in ("sdpa", "mla-torch")]  # mla-torch: skips
    one = _run_pairs(pairs, [Runner("cpu")])
    two = _run_pairs(pairs, [Runner("cpu"), Runner("cpu")])
    assert [r.id for r in two] == [f"{b.name}-{s.id}" for b, s in pairs]
    assert [(r.status, r.err) for r in two] == [(r.status, r.err) for r in one]


def test_config_makes_one_runner_a_gpu_unless_a_device_is_named(monkeypatch):
    from conformance.config import RunConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = RunConfig(backends=(), cases=(), profile="gpu", device=torch.device("cuda"))
    assert [str(r.device) for r in config.runners()] == ["cuda:0", "cuda:1"]  # isolated runners: no CUDA touched yet
    named = RunConfig(backends=(), cases=(), profile="gpu", device=torch.device("cuda", 1))
    assert [str(r.device) for r in named.runners()] == ["cuda:1"]
