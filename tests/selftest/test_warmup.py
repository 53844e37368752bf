"""The warm-up builds each compile key once, with the smallest case, in worker processes."""
import os
import pytest
import torch

import conformance.registry as registry
from conformance.fixtures import CATALOG
from conformance.options import default
from conformance.warmup import warm_up, warm_up_plan

CASES = CATALOG.cases("cpu", ["small_decode", "mixed_small"], kind="mha")
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


def test_a_long_warm_up_says_what_it_is_building(CompilingBackend, tmp_path, monkeypatch, capsys):
    import conformance.warmup as warmup
    monkeypatch.setattr(warmup, "HEARTBEAT_SECONDS", 0.5)
    monkeypatch.setenv("WARM_LOG", str(tmp_path / "warm.log"))
    monkeypatch.setenv("WARM_SECONDS", "3")
    warm_up([CompilingBackend()], CASES[:1], CPU, jobs=1, modules=("warm_backend",))
    err = capsys.readouterr().err
    assert "warm-up: building 1 kernel variants" in err and f"  compiling-{CASES[0].id}" in err
    assert "0/1 built in" in err and f"still building: compiling-{CASES[0].id}" in err


def test_warm_up_runs_one_case_per_key_in_worker_processes(CompilingBackend, tmp_path, monkeypatch):
    log = tmp_path / "warm.log"
    monkeypatch.setenv("WARM_LOG", str(log))
    warm_up([CompilingBackend()], CASES, CPU, jobs=2, modules=("warm_backend",))
    lines = log.read_text().splitlines()
    assert len(lines) == len({(s.dtype, s.heads.head_dim) for s in CASES})
    assert str(os.getpid()) not in {line.split()[0] for line in lines}


class _Config:
    """What the plugin's warm-up reads of a pytest config: the default options, and a stash."""

    def __init__(self):
        self.stash = {}

    def getoption(self, dest):
        values = {"warm_up_jobs": 4, "profile": "cpu", "device": "cpu"}
        return values.get(dest.removeprefix("attn_"), default(dest.removeprefix("attn_")))


def test_warm_up_takes_exactly_the_collected_conformance_tests(monkeypatch):
    import conformance.config
    import conformance.fixtures.pytest_plugin as plugin

    calls = []
    monkeypatch.setattr(conformance.config, "warm_up", lambda backends, specs, *args: calls.append(
        {(b.name, s.id) for b in backends for s in specs if args[-1](b, s)}))
    mla = "tests/test_mla_backend.py::test_mla_backend[flashinfer-mla-small_decode-bf16-bs16-h16]"
    dense = "tests/test_backend.py::test_backend[flashinfer-decode-small_decode-bf16-bs16-gqa4-d128]"
    plugin._warm_up(_Config(), [mla, dense, "tests/selftest/test_cli.py::test_run"])
    assert calls == [{("flashinfer-mla", "small_decode-bf16-bs16-h16"),
                      ("flashinfer-decode", "small_decode-bf16-bs16-gqa4-d128")}]
    plugin._warm_up(_Config(), ["tests/selftest/test_cli.py::test_run", "elsewhere/test_x.py::test_y[a-b]"])
    assert len(calls) == 1  # a run without conformance tests builds nothing
