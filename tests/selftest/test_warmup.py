"""The warm-up builds each compile key once, with the smallest case, in worker processes."""
import os
from pathlib import Path

import pytest
import torch

import conformance.registry as registry
from conformance.matrix import select_cases
from conformance.warmup import warm_up, warm_up_plan

CASES = select_cases("cpu", ["small_decode", "mixed_small"], kind="mha")
CPU = torch.device("cpu")


@pytest.fixture
def CompilingBackend(monkeypatch):
    """The self-test backend, registered (on first import) into a copy of the registry only, so
    the conformance matrix collected after this module never meets it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    from warm_backend import CompilingBackend
    return CompilingBackend


def test_plan_has_the_smallest_case_of_every_key(CompilingBackend):
    plan = warm_up_plan([CompilingBackend()], CASES, CPU)
    keys = {(s.dtype, s.heads.head_dim) for s in CASES}
    assert len(plan) == len(keys) and {(s.dtype, s.heads.head_dim) for _, s in plan} == keys
    for name, spec in plan:
        same_key = [c for c in CASES if (c.dtype, c.heads.head_dim) == (spec.dtype, spec.heads.head_dim)]
        assert name == "compiling" and sum(spec.batch.seq_lens) == min(sum(c.batch.seq_lens) for c in same_key)


def test_backends_without_keys_or_skipped_cases_plan_nothing(CompilingBackend):
    from conformance import Backend, Capabilities

    class NoKeys(Backend):
        name = "no-keys"

    class CudaOnly(CompilingBackend):
        capabilities = Capabilities(devices=frozenset({"cuda"}))

    assert warm_up_plan([NoKeys(), CudaOnly()], CASES, CPU) == []


def test_warm_up_runs_one_case_per_key_in_worker_processes(CompilingBackend, tmp_path, monkeypatch):
    log = tmp_path / "warm.log"
    monkeypatch.setenv("WARM_LOG", str(log))
    warm_up([CompilingBackend()], CASES, CPU, jobs=2, modules=("warm_backend",))
    lines = log.read_text().splitlines()
    assert len(lines) == len({(s.dtype, s.heads.head_dim) for s in CASES})
    assert str(os.getpid()) not in {line.split()[0] for line in lines}


class _Config:
    """What _selected_before_collection reads of a pytest config."""

    def __init__(self, args, keyword=""):
        self.args, self.keyword = args, keyword
        self.rootpath = Path("/somewhere/main")

    def getoption(self, name):
        assert name == "keyword"
        return self.keyword


@pytest.mark.parametrize("args, keyword, selected", [
    ([], "", {"flashinfer-mla", "flashinfer-decode"}),
    ([], "mla", {"flashinfer-mla"}),  # `pytest -k mla` warms up no dense variant
    (["tests/test_mla_backend.py"], "", {"flashinfer-mla"}),
    (["tests/test_backend.py::test_backend"], "", {"flashinfer-decode"}),
    (["tests/selftest/test_cli.py"], "", set()),
    (["tests"], "decode and not mla", {"flashinfer-decode"}),
    ([], "backend and bf16", {"flashinfer-mla", "flashinfer-decode"}),
])
def test_warm_up_follows_the_tests_a_run_selects(args, keyword, selected):
    from conformance.registry import load_backends
    from fixtures.pytest_plugin import _selected_before_collection

    wanted = _selected_before_collection(_Config(args, keyword))
    backends = load_backends()
    pairs = [(backends[n], s) for n in ("flashinfer-mla", "flashinfer-decode")
             for s in select_cases("cpu", ["small_decode"]) if s.kind == backends[n].kind and s.dtype == torch.bfloat16]
    assert {b.name for b, s in pairs if wanted(b, s)} == selected
