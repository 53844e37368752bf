"""The `flashinfer-mla`, `flashinfer-mla-absorbed` and `flashinfer-mla-sparse` adapters translate an
MLA case correctly: run on CPU against a stand-in written from FlashInfer's contract
(fake_flashinfer.py), with broken translations caught (no causal mask; sparse padding read as slot 0)."""
import sys

import fake_flashinfer
import pytest
import torch

from conformance.backends.flashinfer import FlashInferMLA, FlashInferMLASparse
from conformance import Runner, Status
from conformance.fixtures import CATALOG
from stand_in import on_cpu

# fp16 (bf16 on CPU is slow); the wrapper's fp8 path needs bf16 queries: one of those below.
MLA_CASES = [c for c in CATALOG.cases("cpu", kind="mla") if c.dtype == torch.float16 and c.kv_dtype == "auto"
             and c.calls != "graph"]  # graph replay: GPU only
DENSE = [c for c in MLA_CASES if c.topk is None]
SPARSE = [c for c in MLA_CASES if c.topk] + [
    next(c for c in CATALOG.cases("cpu", kind="mla") if c.topk and c.dtype == torch.bfloat16
         and c.kv_dtype == "fp8_e4m3")]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.MODULE)
    monkeypatch.setitem(sys.modules, "flashinfer.mla", fake_flashinfer.MLA)


def _failures(backend, specs):
    runner = Runner("cpu")
    results = [runner.run(on_cpu(backend), spec) for spec in specs]
    assert results
    return [f"{r.id}: {r.status.name} {r.reason}" for r in results if r.status != Status.PASS]


@pytest.mark.parametrize("absorbed_prefill", [False, True], ids=["flashinfer-mla", "flashinfer-mla-absorbed"])
def test_flashinfer_mla_adapter_passes_against_its_contract(fake, absorbed_prefill):
    bad = _failures(FlashInferMLA("flashinfer-mla", absorbed_prefill), DENSE)
    assert not bad, bad[:3]


def test_flashinfer_mla_sparse_adapter_passes_against_its_contract(fake):
    bad = _failures(FlashInferMLASparse(), SPARSE)
    assert not bad, bad[:3]


class NotCausal(FlashInferMLA):
    """Planned without the causal mask: each new query of a sequence sees the later ones too."""

    def _attend(self, case, q_abs, csr, kv_cache, causal):
        return super()._attend(case, q_abs, csr, kv_cache, causal=False)


class PaddingReadAsSlot0(FlashInferMLASparse):
    """Every list passed whole (kv_len = topk), its -1 entries read as slot 0."""

    def sparse_attention(self, case, q_abs, slots):
        T, k = slots.shape
        full = torch.full((T,), k, dtype=torch.int32)
        csr = (torch.arange(T + 1, dtype=torch.int32), torch.arange(T + 1, dtype=torch.int32) * k,
               slots.clamp(min=0).flatten().int(), full)
        return self._attend(case, q_abs, csr, case.latent_cache.view(-1, 1, case.latent_cache.shape[-1]), False)


@pytest.mark.parametrize("mutant", [NotCausal("flashinfer-mla", True), PaddingReadAsSlot0()],
                         ids=["flashinfer-mla-not-causal", "flashinfer-mla-sparse-padding-as-slot-0"])
def test_flashinfer_mla_mistranslation_is_caught(fake, mutant, record_property):
    record_property("mutant", type(mutant).__name__)
    specs = DENSE if isinstance(mutant, NotCausal) else SPARSE
    assert _failures(mutant, specs)
