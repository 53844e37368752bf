"""Invariants of the paged KV cache a backend is handed."""
import dataclasses
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance import BatchSpec, CaseSpec, HeadConfig, make_inputs, scatter_to_cache
from conformance.paged import NULL_BLOCK
from conformance.fixtures import SCENARIOS

CASES = [
    CaseSpec(name, SCENARIOS[name].cpu, HeadConfig(4, 2, 16), torch.float16, bs, causal=SCENARIOS[name].causal)
    for name in ("mixed_small", "chunked_context_prefill", "kv_shorter_than_block", "ragged_many_small",
                 "encoder_prefill", "padded_decode", "empty_sequences")
    for bs in (1, 16, 48)
]


def _logical_slots(case, b, n):
    bs = case.k_cache.shape[1]
    return [int(case.block_table[b, p // bs]) * bs + p % bs for p in range(n)]


@pytest.fixture(params=CASES, ids=[f"{c.scenario}-bs{c.block_size}" for c in CASES])
def built(request):
    inputs = make_inputs(request.param, "cpu", request.param.seed())
    return inputs, inputs.materialize()


def test_blocks_are_private_nonnull_and_shuffled(built):
    inputs, case = built
    spec, bs = case.spec, case.spec.block_size
    owned = []
    for b, s in enumerate(spec.batch.seq_lens):
        blocks = case.block_table[b, : math.ceil(s / bs)].tolist()
        if len(blocks) >= 2:
            assert blocks != list(range(blocks[0], blocks[0] + len(blocks))), f"seq {b}: contiguous pages"
        owned += blocks
    assert len(owned) == len(set(owned)), "a block is shared between sequences"
    assert NULL_BLOCK not in owned
    assert case.k_cache.shape[0] >= 1 + 2 * len(owned), "pool must be at least twice the blocks needed"


def test_garbage_past_each_sequence_points_at_unused_blocks(built):
    _, case = built
    bs = case.spec.block_size
    owned = {int(x) for b, s in enumerate(case.spec.batch.seq_lens) for x in case.block_table[b, : math.ceil(s / bs)]}
    for b, s in enumerate(case.spec.batch.seq_lens):
        tail = case.block_table[b, math.ceil(s / bs):].tolist()
        assert tail, "every row has at least one garbage entry after its last block"
        assert all(x not in owned and x != NULL_BLOCK for x in tail)


def test_slot_mapping_targets_the_new_tokens_positions(built):
    _, case = built
    expected = []
    for b, (s, q) in enumerate(zip(case.spec.batch.seq_lens, case.spec.batch.query_lens)):
        expected += _logical_slots(case, b, s)[s - q:]
    assert case.slot_mapping.tolist() == expected


def test_context_is_written_and_everything_else_is_poison(built):
    inputs, case = built
    hkv, d = case.k_cache.shape[-2:]
    k_flat, v_flat = case.k_cache.view(-1, hkv, d), case.v_cache.view(-1, hkv, d)
    starts = inputs.kv_start_loc.tolist()
    context_slots = []
    for b, (s, q) in enumerate(zip(case.spec.batch.seq_lens, case.spec.batch.query_lens)):
        slots = _logical_slots(case, b, s - q)
        context_slots += slots
        assert torch.equal(k_flat[slots], inputs.k[starts[b]: starts[b] + s - q])
        assert torch.equal(v_flat[slots], inputs.v[starts[b]: starts[b] + s - q])
    poisoned = torch.ones(k_flat.shape[0], dtype=torch.bool)
    poisoned[context_slots] = False
    assert k_flat[poisoned].isnan().all() and v_flat[poisoned].isnan().all()
    assert not k_flat[~poisoned].isnan().any()
    assert case.out.isnan().all(), "output buffers start as NaN so unwritten rows fail"


def test_default_scatter_fills_exactly_the_new_slots(built):
    inputs, case = built
    scatter_to_cache(case)
    hkv, d = case.k_cache.shape[-2:]
    assert torch.equal(case.k_cache.view(-1, hkv, d)[case.slot_mapping], inputs.k[inputs.new_token_index])
    written = case.k_cache.view(-1, hkv, d).isnan().all(-1).all(-1).logical_not().sum()
    assert int(written) == sum(case.spec.batch.seq_lens)


def test_finite_poison_mode():
    spec = CASES[0]
    case = make_inputs(spec, "cpu", 0).materialize(finite_poison=True)
    assert math.isfinite(case.poison) and case.poison >= 1e3
    assert not case.k_cache.isnan().any() and (case.k_cache == case.poison).any()


def test_far_pages_lie_past_2_to_the_31_elements():
    """Checked on the draw alone: the cache itself would take gigabytes (test_mutants runs one)."""
    from conformance.paged import draw_pages

    spec = CASES[0].replace(far_pages=True)
    pages = draw_pages(spec, torch.Generator().manual_seed(0), torch.device("cpu"))
    per_block = spec.block_size * spec.heads.num_kv_heads * spec.heads.head_dim
    used = pages["block_table"][pages["block_table"] != 0].long()
    assert int(used.min()) * per_block >= 2**31 > (spec.first_block - 1) * per_block
    assert pages["num_blocks"] * per_block >= 2**31 and int(used.max()) < pages["num_blocks"]
    plain = draw_pages(CASES[0], torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(plain["block_table"] + spec.first_block - 1, pages["block_table"])  # the same draw, moved


def test_extreme_logits_reach_1e4():
    from conformance.matrix import EXTREME_LOGIT_STD

    spec = CASES[0].replace(logit_std=EXTREME_LOGIT_STD, dtype=torch.float32)
    inputs = make_inputs(spec, "cpu", spec.seed())
    g = spec.heads.group_size
    logits = torch.einsum("thd,nhd->thn", inputs.q.double(), inputs.k.double().repeat_interleave(g, 1)) * spec.scale
    assert 0.8 * EXTREME_LOGIT_STD < float(logits.std()) < 1.2 * EXTREME_LOGIT_STD
    assert float(logits.abs().max()) > 7e3


def test_inputs_are_bit_identical_whatever_ran_before():
    spec = CASES[3]
    a = make_inputs(spec, "cpu", spec.seed())
    torch.randn(1000)  # global RNG state must not matter
    make_inputs(CASES[0], "cpu", CASES[0].seed())
    b = make_inputs(spec, "cpu", spec.seed())
    for name in ("q", "k", "v", "block_table", "slot_mapping"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_fresh_case_per_materialize():
    inputs = make_inputs(CASES[0], "cpu", 0)
    c1 = inputs.materialize()
    c1.k_cache.zero_()
    c1.q.zero_()
    c2 = inputs.materialize()
    assert c2.k_cache.isnan().any() and c2.q.abs().sum() > 0


def test_shapes_and_dtypes_handed_to_adapters():
    spec = CaseSpec("t", BatchSpec([5, 20], [2, 20]), HeadConfig(6, 2, 32), torch.bfloat16, 16)
    case = make_inputs(spec, "cpu", 0).materialize()
    assert case.q.shape == (22, 6, 32) and case.k_new.shape == (22, 2, 32)
    assert case.k_cache.shape[1:] == (16, 2, 32) and case.k_cache.dtype == torch.bfloat16
    assert case.block_table.dtype == torch.int32 and case.slot_mapping.dtype == torch.int64
    assert case.query_start_loc.tolist() == [0, 2, 22] and case.seq_lens.tolist() == [5, 20]
    assert case.context_lens.tolist() == [3, 0] and case.max_query_len == 20 and case.max_seq_len == 20


def test_fp8_quantization_rounds_ties_to_even():
    """Quotients exactly between two e4m3 codes go to the even one (21 -> 20, 22.5... ), and the
    division is the correctly rounded one: the multiply-by-reciprocal torch does on CUDA for a
    scalar divisor gives 21.0000019 and the wrong code."""
    from conformance.paged import quantize
    scale = float(torch.tensor(0.0228445865213871, dtype=torch.float32))
    x = torch.tensor([21.0, 42.0, -21.0, 5.25, 11.0], dtype=torch.float32) * scale
    assert quantize(x, scale, torch.float8_e4m3fn).float().tolist() == [20.0, 40.0, -20.0, 5.0, 11.0]
    assert quantize(x, scale, torch.float32) is x  # an "auto" cache stores the values as they are


@pytest.mark.parametrize("layout", ["nhd", "hnd", "combined_nhd", "combined_hnd"])
def test_cache_layouts_lay_out_the_same_cache(layout):
    """Every layout holds the same values at [block, slot, head, dim]; stored_cache() gives the
    memory as the layout says (HND: heads before slots; combined: each page's K, then its V)."""
    base = CASES[1]
    spec = base.replace(kv_layout=layout)
    nhd = make_inputs(base, "cpu", 0).materialize()
    case = make_inputs(spec, "cpu", 0).materialize()
    assert torch.equal(case.k_cache.nan_to_num(7), nhd.k_cache.nan_to_num(7))
    assert torch.equal(case.v_cache.nan_to_num(7), nhd.v_cache.nan_to_num(7))
    nb, bs, hkv, d = case.k_cache.shape
    stored = case.stored_cache()
    page = (hkv, bs, d) if layout.endswith("hnd") else (bs, hkv, d)
    if layout.startswith("combined"):
        assert stored.shape == (nb, 2, *page) and stored.is_contiguous()
        k_mem, v_mem = stored[:, 0], stored[:, 1]
    else:
        assert all(x.shape == (nb, *page) and x.is_contiguous() for x in stored)
        k_mem, v_mem = stored
    want = (lambda c: c.transpose(1, 2)) if layout.endswith("hnd") else (lambda c: c)
    assert torch.equal(k_mem.nan_to_num(7), want(nhd.k_cache).nan_to_num(7))
    assert torch.equal(v_mem.nan_to_num(7), want(nhd.v_cache).nan_to_num(7))


@pytest.mark.parametrize("layout", ["hnd", "combined_nhd"])
def test_cache_check_sees_a_write_in_the_wrong_place_of_a_strided_layout(layout):
    """A backend that writes the new tokens through contiguous-NHD slot arithmetic into memory of
    another layout must fail on its cache, besides its slots' correct values."""
    from conformance import Backend, Capabilities, Runner, Status
    from conformance.registry import ALL_KV_LAYOUTS

    class WritesAsNhd(Backend):
        name = "writes-as-nhd"
        capabilities = Capabilities(kv_layouts=ALL_KV_LAYOUTS, features=frozenset({"causal", "non_causal"}))

        def write_cache(self, case):
            stored = case.stored_cache()
            k_mem = stored[0] if isinstance(stored, tuple) else stored
            scatter_to_cache(case)
            k_mem.view(-1, *case.k_cache.shape[2:])[case.slot_mapping] = case.k_new  # slot math of NHD

        def run(self, case):
            return case.out.zero_()

    spec = CASES[1].replace(kv_layout=layout)  # block size 16: with 1, HND and NHD memory coincide
    result = Runner("cpu").run(WritesAsNhd(), spec)
    assert result.status == Status.FAIL and "k_cache:" in result.reason, result.reason


def _digest(spec) -> str:
    """Every field of a case's drawn inputs, as bytes."""
    h = hashlib.sha256()
    inputs = make_inputs(spec, "cpu", spec.seed(7))
    for f in dataclasses.fields(inputs):
        x = getattr(inputs, f.name)
        h.update(x.contiguous().view(torch.uint8).numpy().tobytes() if isinstance(x, torch.Tensor) else repr(x).encode())
    return h.hexdigest()


def _some_cases():
    from conformance.fixtures import CATALOG

    specs = [s for s in CATALOG.cases("cpu") if s.scenario == "mixed_small" and s.block_size == 16][:6]
    return specs + [s for s in CATALOG.cases("cpu", kind="mla") if s.scenario == "small_decode"][:2]


def test_inputs_are_bit_identical_in_another_process_in_another_order():
    """What lets pytest-xdist, process isolation and reruns judge the very same data: a case's
    inputs depend on its id and the base seed only (not on order, process, RNG state or hash salt)."""
    here = [_digest(s) for s in _some_cases()]
    code = ("import sys, torch; sys.path[:0] = sys.argv[1:]; torch.manual_seed(123); import test_paged as t; "
            "print(' '.join(reversed([t._digest(s) for s in reversed(t._some_cases())])))")
    paths = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).parent)]
    there = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.split()
    assert len(here) == 8 and there == here


@pytest.mark.parametrize("bs", [1, 16, 48])
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_a_shared_prompt_is_one_set_of_blocks_and_one_set_of_tokens(bs, kind):
    """Prefix sharing: a group's members point at their first member's blocks for the prompt's full
    blocks, hold their own copy of a partly filled last prompt block, and read the same prompt."""
    from conformance import MLAHeads

    heads = MLAHeads(2, kv_lora_rank=32, qk_rope_head_dim=16) if kind == "mla" else HeadConfig(4, 2, 16)
    spec = CaseSpec("shared_prefix_4x8", SCENARIOS["shared_prefix_4x8"].cpu, heads, torch.float16, bs)
    inputs = make_inputs(spec, "cpu", spec.seed())
    b, table, start = spec.batch, inputs.block_table, inputs.kv_start_loc
    packed = inputs.latent if kind == "mla" else inputs.k
    shared = []
    for i in range(b.batch_size):
        first = i - i % b.group_size
        p = b.shared_prefix_lens[first // b.group_size]
        full, own = p // bs, -(-b.seq_lens[i] // bs)
        assert torch.equal(table[i, :full], table[first, :full])
        assert i == first or not set(table[i, full:own].tolist()) & set(table[first, :own].tolist())
        assert torch.equal(packed[start[i]:start[i] + p], packed[start[first]:start[first] + p])
        if i == first:
            shared += table[i, :full].tolist()
    assert sorted(inputs.shared_blocks.tolist()) == sorted(shared) and shared
    case = inputs.materialize()
    cache = case.latent_cache if kind == "mla" else case.k_cache
    for i in range(b.batch_size):  # every member reads its prompt through the table
        p = b.shared_prefix_lens[i // b.group_size]
        pos = torch.arange(p)
        got = cache[table[i, pos // bs].long(), pos % bs]
        stored = inputs.stored(slice(start[i], start[i] + p)) if kind == "mla" else \
            inputs.stored("k", slice(start[i], start[i] + p))
        assert torch.equal(got, stored)


def test_interleaved_pages_alternate_between_sequences_and_decrease():
    from conformance import BatchSpec, CaseSpec, HeadConfig, make_inputs

    spec = CaseSpec("t", BatchSpec([40, 33, 0, 17], [5, 1, 0, 17]), HeadConfig(4, 2, 16), torch.float16, 8,
                    page_order="interleaved")
    inputs = make_inputs(spec, "cpu", 0)
    table, lens = inputs.block_table.tolist(), [5, 5, 0, 3]
    owned = [row[:n] for row, n in zip(table, lens)]
    assert owned[0][:3] == [13, 10, 7] and owned[1][:3] == [12, 9, 6] and owned[3] == [11, 8, 5]
    assert all(row == sorted(row, reverse=True) for row in owned)
    mine = {b for row in owned for b in row}
    garbage = {b for row, n in zip(table, lens) for b in row[n:]}
    assert not mine & garbage and 0 not in mine  # past a sequence's end: unused blocks only
    assert spec.id.endswith("-interleaved") and not spec.is_plain
