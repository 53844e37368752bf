"""The `flashmla` and `flashmla-sparse` adapters translate an MLA case correctly: run on CPU against
a stand-in written from FlashMLA's contract (fake_flashmla.py), with broken translations caught
(the dense LSE's [B, H, s_q] read as [B, s_q, H]; the sparse kernel's base-2 LSE read as natural)."""
import math
import sys

import fake_flashmla
import pytest
import torch

from conformance.backends.flashmla import FlashMLA, FlashMLASparse
from conformance import Runner, Status
from conformance.fixtures import CATALOG
from stand_in import on_cpu

# FlashMLA's dense decode takes bf16/fp16 latents only (fp8 skips with the reason); fp16 here
# (bf16 on CPU is slow), its one page size.
CASES = [c for c in CATALOG.cases("cpu", kind="mla") if c.block_size == 64 and c.dtype == torch.float16
         and c.kv_dtype == "auto" and c.topk is None]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_mla", fake_flashmla.MODULE)


def test_flashmla_adapter_passes_against_its_contract(fake):
    runner = Runner("cpu")
    results = [runner.run(on_cpu(FlashMLA()), spec) for spec in CASES]
    bad = [f"{r.id}: {r.reason}" for r in results if r.status != Status.PASS]
    assert not bad, bad[:3]


def test_flashmla_lse_layout_slip_is_caught(fake, monkeypatch, record_property):
    record_property("mutant", "flashmla-lse-layout-slip")
    real = fake_flashmla.flash_mla_with_kvcache

    def lse_read_tokens_major(*args, **kwargs):  # the adapter's LSE [B, H, s_q] taken as [B, s_q, H]
        out, lse = real(*args, **kwargs)
        return out, lse.reshape(lse.shape[0], lse.shape[2], lse.shape[1]).transpose(1, 2)

    monkeypatch.setattr(fake_flashmla.MODULE, "flash_mla_with_kvcache", lse_read_tokens_major)
    runner = Runner("cpu")
    statuses = {runner.run(on_cpu(FlashMLA()), spec).status for spec in CASES if spec.scenario == "spec_decode_small"}
    assert Status.FAIL in statuses


SPARSE = [c for c in CATALOG.cases("cpu", kind="mla") if c.topk and c.dtype == torch.bfloat16 and c.kv_dtype == "auto"]


def test_flashmla_sparse_adapter_passes_against_its_contract(fake):
    runner = Runner("cpu")
    results = [runner.run(on_cpu(FlashMLASparse()), spec) for spec in SPARSE]
    bad = [f"{r.id}: {r.reason}" for r in results if r.status != Status.PASS]
    assert results and not bad, bad[:3]


def test_flashmla_sparse_lse_base_slip_is_caught(fake, monkeypatch, record_property):
    """The kernel's base-2 LSE taken as a natural log."""
    record_property("mutant", "flashmla-sparse-lse-base-2-as-e")
    monkeypatch.setattr(FlashMLASparse, "sparse_attention", _lse_base_slip)
    assert Runner("cpu").run(on_cpu(FlashMLASparse()), SPARSE[0]).status == Status.FAIL


def _lse_base_slip(self, case, q_abs, slots):
    out, lse = FLASHMLA_SPARSE_ATTENTION(self, case, q_abs, slots)
    return out, lse / math.log(2)


FLASHMLA_SPARSE_ATTENTION = FlashMLASparse.sparse_attention
