"""The FlashAttention adapters translate a Case correctly: run on CPU against stand-ins written
from each library's documented contract (fake_flash.py), since none of the libraries runs in CI.
A stand-in that agrees with the ground truth on every case, and a broken translation caught,
show the translation, not the library."""
import json
import lzma
import sys
import types
from pathlib import Path

import fake_flash
import pytest
import torch

import conformance.backends.flash_attn as fa
from conformance import Runner, Status
from conformance.fixtures import CATALOG
from stand_in import CPU, on_cpu

CASES = [c for c in CATALOG.cases("cpu", ["mixed_small", "chunked_context_prefill", "encoder_prefill"], kind="mha")
         if c.dtype != torch.float32 and c.kv_dtype == "auto" and c.kv_layout == "nhd" and c.block_size == 16]


@pytest.fixture
def fakes(monkeypatch):
    for name, module in fake_flash.MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)


def _adapters():
    features = fa.DEFAULT_FEATURES
    return {
        "fa2": fa.FlashAttn2("fake-fa2", "fake_flash_attn", "", dict(CPU)),
        "fa3": fa.FlashAttn3("fake-fa3", "fake_flash_attn_interface", "", dict(CPU)),
        "fa4": fa.FlashAttn4("fake-fa4", "fake_flash_attn_cute", "", dict(CPU, features=features | {"sinks"})),
        "vllm-fa2": fa.FlashAttnVllm("fake-vllm-fa2", 2, dict(CPU), module="fake_vllm_flash_attn"),
        "vllm-fa3": fa.FlashAttnVllm("fake-vllm-fa3", 3, dict(CPU, features=features | {"sinks"}),
                                     module="fake_vllm_flash_attn"),
    }


@pytest.fixture
def torch_adapter(monkeypatch):
    """flash-torch over a stand-in varlen_attn; the cached signature is dropped before and after."""
    def install(fake):
        monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", fake)
        fa._varlen_params.cache_clear()
        return on_cpu(fa.FlashTorch())
    yield install
    fa._varlen_params.cache_clear()


def _results(backend, cases):
    runner = Runner("cpu")
    return [runner.run(backend, spec) for spec in cases]


@pytest.mark.parametrize("flavour", ["fa2", "fa3", "fa4", "vllm-fa2", "vllm-fa3"])
def test_flash_attn_adapters_pass_against_their_contract(fakes, flavour):
    results = _results(_adapters()[flavour], CASES)
    bad = [f"{r.id}: {r.reason}" for r in results if r.status not in (Status.PASS, Status.SKIP)]
    assert not bad, bad[:3]
    passed = {r.case for r in results if r.status == Status.PASS}
    assert any("-sw" in c for c in passed) and any("-cap" in c for c in passed) and any("encoder" in c for c in passed)
    assert (flavour in ("fa4", "vllm-fa3")) == any("-sinks" in c for c in passed)


@pytest.mark.parametrize("fake, block_size", [(fake_flash.varlen_attn_211, 16), (fake_flash.varlen_attn_paged, 256)])
def test_flash_torch_adapter_passes_on_either_torch(fake, block_size, torch_adapter):
    backend = torch_adapter(fake)
    assert backend.paged == (fake is fake_flash.varlen_attn_paged)
    cases = [c.replace(block_size=block_size) for c in CASES]
    results = _results(backend, cases)
    assert {r.status for r in results} == {Status.PASS, Status.SKIP}, [r.reason for r in results if r.status != Status.PASS][:3]
    assert {r.reason for r in results if r.status == Status.SKIP} == {
        "feature softcap not supported", "feature sinks not supported",
        "the captured batch: no CUDA-graph replay (Capabilities.cuda_graphs)"}


@pytest.mark.parametrize("bug, patch", [
    ("window of w + 1 keys", ("_window", lambda case: (case.spec.sliding_window, 0) if case.spec.sliding_window
                              else (-1, -1))),
    ("LSE left as [Hq, T]", ("_lse_tokens_first", lambda lse, case: lse)),
])
def test_a_broken_translation_is_caught(fakes, monkeypatch, bug, patch, record_property):
    record_property("mutant", f"flash-attn2 adapter: {bug}")
    monkeypatch.setattr(fa, *patch)
    results = _results(_adapters()["fa2"], [c for c in CASES if "-sw" in c.id or c.heads.num_q_heads == 8][:12])
    assert any(r.status in (Status.FAIL, Status.ERROR) for r in results), bug


def test_vllm_build_without_its_extension_skips_with_its_reason(monkeypatch):
    """vllm.vllm_flash_attn imports with one extension missing (FA3 off Hopper builds, an ABI
    mismatch): the adapter of that version skips with the reason its interface module recorded."""
    interface = types.SimpleNamespace(FA2_AVAILABLE=True, FA3_AVAILABLE=False,
                                      FA3_UNAVAILABLE_REASON="undefined symbol: torch_library_impl")
    monkeypatch.setitem(sys.modules, "fake_vllm_flash_attn", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "fake_vllm_flash_attn.flash_attn_interface", interface)
    adapters = _adapters()
    assert adapters["vllm-fa2"].unavailable() is None
    assert adapters["vllm-fa3"].unavailable() == (
        "fake_vllm_flash_attn has no FA3 extension (undefined symbol: torch_library_impl)")


def test_fa4_known_failure_names_exactly_the_pairs_that_failed_on_the_h200():
    """flash-attn4's known failure, against the committed H200 run: every failing pair, and no other."""
    report = Path(__file__).parents[2] / "results" / "h200-flash-attn4-gpu-profile.json.xz"
    results = json.loads(lzma.decompress(report.read_bytes()))["results"]
    ran = [r for r in results if r["status"] != "SKIP"]
    (entry,) = fa.FlashAttn4.known_failures
    failed = {r["case"] for r in ran if r["status"] != "PASS"}
    assert entry.compute_capability == (9, 0)  # the H200's
    assert len(failed) == 18 and failed == {r["case"] for r in ran if entry.matches(r["case"])}
