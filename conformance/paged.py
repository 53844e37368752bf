"""The paged KV cache a backend sees, built from a CaseSpec with seeded random data.

Inputs holds every random draw of a case (queries, the logical K/V of each sequence, the block
assignment); materialize() turns it into a fresh Case for one backend run: a poisoned cache with
the context pre-written, the new tokens' K/V and slot mapping, and a NaN-filled output buffer.
The logical K/V stay with the harness (the reference reads them, backends never do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .spec import FP8_CACHE_DTYPES, CaseSpec

NULL_BLOCK = 0  # vLLM's convention: block 0 is reserved and never holds data


def quantize(x: torch.Tensor, scale: float, cache_dtype: torch.dtype) -> torch.Tensor:
    """What a cache of `cache_dtype` stores for values x: x itself, or for an fp8 cache the code
    round-to-nearest-even(fp32(x) / scale), the division correctly rounded to fp32 (IEEE). A cache
    write must store exactly these codes (the cache check compares bits)."""
    if cache_dtype == x.dtype:
        return x
    # float64 then fp32 is the correctly rounded fp32 quotient (53 >= 2 * 24 + 2 bits). Not
    # x.float() / scale: torch on CUDA multiplies by the reciprocal of a scalar divisor, which
    # lands on the wrong side of exact fp8 ties (21.0000019 for 21).
    return (x.double() / scale).float().to(cache_dtype)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(x: torch.Tensor) -> torch.Tensor:
    """Bits, not values: fp8 codes must match exactly, and untouched poison stays the same NaN."""
    return x.view(_SAME_SIZE_INT[x.element_size()])


def dequantize(stored: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache contents as the values they stand for (code * scale), in `dtype`."""
    if stored.dtype in FP8_CACHE_DTYPES.values():
        return (stored.to(torch.float64) * scale).to(dtype)
    return stored.to(dtype)


def poison_value(dtype: torch.dtype, finite: bool) -> float:
    """NaN shows any read of an unused slot; finite poison (for backends that mask by multiplying
    with 0, where NaN * 0 = NaN) is still large enough that an unmasked read ruins the output. A
    cache of bytes (a split latent cache) is filled with 0xFF, NaN in each of its fp8, fp32 and
    16-bit fields, or 0x5F (30 as fp8, about 1.6e19 as fp32 and bf16, 472 as fp16)."""
    if dtype == torch.uint8:
        return 0x5F if finite else 0xFF
    return min(1e4, torch.finfo(dtype).max / 4) if finite else math.nan


@dataclass
class PagedBatch:
    """What every adapter gets, whatever the attention: the queries, the batch's bookkeeping over
    the paged cache, and the output buffer. Tensors are fresh per run; the adapter may write the
    caches and `out`. T new tokens (all sequences, packed in order), B sequences, H heads.
    """

    # The fields with one row per new token (a call over some of the tokens takes those rows).
    new_token_fields: ClassVar[tuple[str, ...]] = ("q", "slot_mapping")

    spec: CaseSpec
    q: torch.Tensor  # [T, Hq, D]
    block_table: torch.Tensor  # [B, max_blocks] int32; entries past a sequence's last block are garbage
    slot_mapping: torch.Tensor  # [T] int64: block_table[b, pos // bs] * bs + pos % bs of each new token
    seq_lens: torch.Tensor  # [B] int32, context + new tokens
    context_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32, cu_seqlens of the queries
    max_query_len: int
    max_seq_len: int
    out: torch.Tensor  # [T, Hq, Dv], NaN-filled: rows a backend leaves unwritten fail
    poison: float

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def scale(self) -> float:
        return self.spec.scale


@dataclass
class Case(PagedBatch):
    """A dense case (spec.kind "mha"): queries over K/V heads, D the head dim of q, K, V and out."""

    new_token_fields: ClassVar[tuple[str, ...]] = PagedBatch.new_token_fields + ("k_new", "v_new")
    k_new: torch.Tensor  # [T, Hkv, D], the new tokens' keys, to be written to the cache
    v_new: torch.Tensor  # [T, Hkv, D]
    # The caches, always indexed [block, slot, head, dim] ([num_blocks, block_size, Hkv, D], of
    # spec.cache_dtype; context pre-written, the rest poisoned), whatever spec.kv_layout puts in
    # memory: for "hnd" and the combined layouts they are strided views. stored_cache() gives the
    # tensors as laid out, for libraries that take a layout.
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: float = 1.0  # fp8 caches: a stored code c stands for c * k_scale (exact in fp32)
    v_scale: float = 1.0
    sinks: torch.Tensor | None = None  # [Hq] float32 sink logits when spec.sinks, else None
    kv_combined: torch.Tensor | None = None  # combined layouts: the one [num_blocks, 2, ...] tensor

    def stored_cache(self) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """The cache as spec.kv_layout lays it out: a (k, v) pair of [num_blocks, block_size, Hkv, D]
        ("nhd") or [num_blocks, Hkv, block_size, D] ("hnd") tensors, or for the combined layouts the
        one [num_blocks, 2, block_size, Hkv, D] / [num_blocks, 2, Hkv, block_size, D] tensor."""
        if self.kv_combined is not None:
            return self.kv_combined
        if self.spec.kv_layout == "hnd":
            return self.k_cache.transpose(1, 2), self.v_cache.transpose(1, 2)
        return self.k_cache, self.v_cache


@dataclass
class Pages:
    """A case's queries and paged layout, drawn from its seed, the same for every kind of case:
    where each sequence's tokens sit in the packed logical K/V and in the cache."""

    spec: CaseSpec
    q: torch.Tensor  # [T, Hq, D]
    kv_start_loc: torch.Tensor  # [B + 1] int64: sequence b's tokens are rows kv_start_loc[b].. of the packed K/V
    new_token_index: torch.Tensor  # [T] int64: row of each new token in the packed K/V
    context_index: torch.Tensor  # [N - T] int64: rows of context tokens in the packed K/V
    context_slots: torch.Tensor  # [N - T] int64: cache slot of each context token
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_blocks: int
    shared_blocks: torch.Tensor  # ids of blocks in more than one sequence's table (a shared prompt's); empty if none

    def batch_fields(self, out_dim: int, poison: float) -> dict:
        """The PagedBatch fields of a fresh case, its output [T, Hq, out_dim] NaN-filled."""
        b, dev = self.spec.batch, self.q.device
        i32 = dict(dtype=torch.int32, device=dev)
        return dict(
            spec=self.spec,
            q=self.q.clone(),
            block_table=self.block_table.clone(),
            slot_mapping=self.slot_mapping.clone(),
            seq_lens=torch.tensor(b.seq_lens, **i32),
            context_lens=torch.tensor(b.context_lens, **i32),
            query_start_loc=torch.tensor([0, *_cumsum(b.query_lens)], **i32),
            max_query_len=max(b.query_lens),
            max_seq_len=max(b.seq_lens),
            out=torch.full((*self.q.shape[:2], out_dim), math.nan, dtype=self.q.dtype, device=dev),
            poison=poison,
        )


@dataclass
class Inputs(Pages):
    """All random data of a dense case, drawn once from the case's own seed."""

    k: torch.Tensor  # [N, Hkv, D], every sequence's keys packed (context then new tokens)
    v: torch.Tensor
    k_scale: float = 1.0
    v_scale: float = 1.0
    sinks: torch.Tensor | None = None  # [Hq] float32

    def stored(self, which: str, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Rows of the packed K or V ('k' / 'v') as the cache stores them (fp8 codes for an fp8 cache)."""
        x, scale = (self.k, self.k_scale) if which == "k" else (self.v, self.v_scale)
        return quantize(x[rows], scale, self.spec.cache_dtype)

    def materialize(self, finite_poison: bool = False) -> Case:
        spec = self.spec
        bs = spec.block_size
        poison = poison_value(spec.cache_dtype, finite_poison)
        k_cache, v_cache, kv_combined = _allocate_cache(spec, self.num_blocks, poison, self.q.device)
        for which, c in (("k", k_cache), ("v", v_cache)):
            c[self.context_slots // bs, self.context_slots % bs] = self.stored(which, self.context_index)
        return Case(
            **self.batch_fields(spec.heads.head_dim, poison),
            k_new=self.k[self.new_token_index],
            v_new=self.v[self.new_token_index],
            k_cache=k_cache,
            v_cache=v_cache,
            kv_combined=kv_combined,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            sinks=None if self.sinks is None else self.sinks.clone(),
        )


def _allocate_cache(spec: CaseSpec, num_blocks: int, poison: float, device):
    """Poison-filled K and V caches laid out as spec.kv_layout says, both returned as
    [num_blocks, block_size, Hkv, D] views, and the combined tensor (or None)."""
    bs, hkv, d = spec.block_size, spec.heads.num_kv_heads, spec.heads.head_dim
    hnd = spec.kv_layout.endswith("hnd")
    page = (hkv, bs, d) if hnd else (bs, hkv, d)
    full = dict(fill_value=poison, dtype=spec.cache_dtype, device=device)
    if spec.kv_layout.startswith("combined"):
        combined = torch.full((num_blocks, 2, *page), **full)
        k, v = combined[:, 0], combined[:, 1]
    else:
        combined = None
        k, v = torch.full((num_blocks, *page), **full), torch.full((num_blocks, *page), **full)
    if hnd:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    return k, v, combined


def _cumsum(xs) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


def make_dense_inputs(spec: CaseSpec, device: torch.device | str, seed: int) -> Inputs:
    """Draw a dense case's data. Every draw comes from one generator seeded by the case, so the same
    case gives the same tensors on a device whatever ran before it."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    h = spec.heads
    n_total, n_new = sum(spec.batch.seq_lens), spec.batch.num_query_tokens

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(spec.dtype)

    # Keys are N(0, 1), so logits scale * q.k have std logit_std (exactly the same draws when it is 1).
    q = randn(n_new, h.num_q_heads, h.head_dim, std=spec.logit_std / (spec.scale * h.head_dim ** 0.5))
    k = randn(n_total, h.num_kv_heads, h.head_dim)
    v = randn(n_total, h.num_kv_heads, h.head_dim)
    pages = draw_pages(spec, gen, device)
    copy_shared_prefix(spec, k, v)
    # Sink logits spread from negligible to dominant: N(0, 2) against scores of about N(0, 1). bf16
    # values (as gpt-oss stores them) in fp32: exact for a kernel that takes either (vLLM's FA3: bf16 only).
    sinks = (2 * torch.randn(h.num_q_heads, generator=gen, device=device)).bfloat16().float() if spec.sinks else None
    k_scale, v_scale = (fp8_scale(x, spec) for x in (k, v))
    return Inputs(spec=spec, q=q, k=k, v=v, **pages, k_scale=k_scale, v_scale=v_scale, sinks=sinks)


def fp8_scale(x: torch.Tensor, spec: CaseSpec) -> float:
    """A calibrated per-tensor scale, as an engine would set it: amax over the fp8 range's half,
    rounded to fp32 so that every implementation holds the same scale. 1 for a cache of the case's dtype
    (or a split latent cache, whose scales are in its entries)."""
    if spec.kv_dtype not in FP8_CACHE_DTYPES:  # the dtype's own, or a split cache's scales of its own
        return 1.0
    fp8_max = torch.finfo(spec.cache_dtype).max
    return float(torch.tensor(float(x.abs().max()) / (fp8_max / 2), dtype=torch.float32))


def draw_pages(spec: CaseSpec, gen: torch.Generator, device: torch.device) -> dict:
    """The Pages fields of a case (but spec and q): its blocks, a random non-contiguous pick from a
    pool twice the size needed (block 0, the null block, excluded), and its token bookkeeping."""
    b, bs = spec.batch, spec.block_size
    seq_lens = torch.tensor(b.seq_lens, dtype=torch.int64, device=device)
    query_lens = torch.tensor(b.query_lens, dtype=torch.int64, device=device)
    n_total = sum(b.seq_lens)
    blocks_per_seq = [math.ceil(s / bs) for s in b.seq_lens]
    needed = sum(blocks_per_seq)
    first, num_blocks = spec.first_block, spec.pool_blocks  # blocks below the pool stay poisoned and unused
    perm = torch.randperm(2 * needed, generator=gen, device=device) + first
    if spec.page_order == "interleaved":  # the batch's blocks are one run of ids, the rest of the pool unused
        perm = torch.cat([torch.arange(first + needed - 1, first - 1, -1, device=device), perm[perm >= first + needed]])
    used, unused = perm[:needed], perm[needed:]
    width = max(blocks_per_seq) + 1  # one spare column: even the longest sequence has garbage after it
    # Garbage past each sequence's last block: ids of unused (poisoned) blocks, so a read past the
    # end shows as NaN rather than as another sequence's plausible data.
    table = unused[torch.randint(0, unused.numel(), (b.batch_size, width), generator=gen, device=device)]
    col = torch.arange(width, device=device)
    nblk = torch.tensor(blocks_per_seq, device=device)
    owned = col[None, :] < nblk[:, None]
    if spec.page_order == "interleaved":  # dealt column by column over the sequences, ids decreasing
        cols, rows = torch.nonzero(owned.T, as_tuple=True)
        table[rows, cols] = used
    else:
        table[owned] = used  # row-major fill: sequence 0 takes the first blocks of the permutation, ...
        # A random pick can still come out as consecutive ids; swap the first two blocks of any such
        # sequence, so an adapter that assumes contiguous pages always reads the wrong ones.
        step_ok = (table[:, 1:] == table[:, :-1] + 1) | ~owned[:, 1:]
        contiguous = step_ok.all(1) & (nblk >= 2)
        table[contiguous, :2] = table[contiguous, :2].flip(1)
    shared_blocks = _share_prefix_blocks(b, bs, table)
    table = table.to(torch.int32)

    # Token bookkeeping for the packed logical K/V.
    kv_start = torch.zeros(b.batch_size + 1, dtype=torch.int64, device=device)
    kv_start[1:] = torch.cumsum(seq_lens, 0)
    seq_of_token = torch.repeat_interleave(torch.arange(b.batch_size, device=device), seq_lens)
    pos = torch.arange(n_total, device=device) - kv_start[seq_of_token]
    slots = table[seq_of_token, pos // bs].to(torch.int64) * bs + pos % bs
    is_new = pos >= (seq_lens - query_lens)[seq_of_token]
    new_idx = torch.nonzero(is_new).flatten()
    ctx_idx = torch.nonzero(~is_new).flatten()
    return dict(kv_start_loc=kv_start, new_token_index=new_idx, context_index=ctx_idx,
                context_slots=slots[ctx_idx], block_table=table, slot_mapping=slots[new_idx], num_blocks=num_blocks,
                shared_blocks=shared_blocks)


def _share_prefix_blocks(b, bs: int, table: torch.Tensor) -> torch.Tensor:
    """Point every member of a prompt group at its first member's blocks for the prompt's full
    blocks (in place); the blocks they held there stay unused. Returns the shared block ids."""
    shared = []
    for first in range(0, b.batch_size if b.shared_prefix_lens else 0, b.group_size):
        full = b.shared_prefix_lens[first // b.group_size] // bs
        table[first + 1:first + b.group_size, :full] = table[first, :full]
        shared.append(table[first, :full])
    return torch.cat(shared) if shared else table.new_zeros(0)


def copy_shared_prefix(spec: CaseSpec, *packed: torch.Tensor) -> None:
    """Give every member of a prompt group its first member's prompt tokens: rows of the packed
    per-token tensors (K and V, or latents), in place. The reference then attends the same prompt
    that the shared blocks hold."""
    b = spec.batch
    start = [0, *_cumsum(b.seq_lens)]  # in Python: no device round trip per sequence
    for i in range(b.batch_size if b.shared_prefix_lens else 0):
        first = i - i % b.group_size
        if i != first:
            p = b.shared_prefix_lens[first // b.group_size]
            for x in packed:
                x[start[i]:start[i] + p] = x[start[first]:start[first] + p]


def scatter_to_cache(case: Case) -> None:
    """The default cache write: the new tokens' K/V into their slots (quantized for an fp8 cache).
    Adapters with their own cache-write op override Backend.write_cache instead."""
    bs = case.k_cache.shape[1]
    block, offset = case.slot_mapping // bs, case.slot_mapping % bs
    case.k_cache[block, offset] = quantize(case.k_new, case.k_scale, case.k_cache.dtype)
    case.v_cache[block, offset] = quantize(case.v_new, case.v_scale, case.v_cache.dtype)


def gather_kv(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's K/V read back from the paged cache through its block table, packed:
    ([N, Hkv, D], [N, Hkv, D], kv_start_loc [B + 1]). For adapters whose library takes no pages.
    It repeats the builder's slot arithmetic on purpose: adapter-side code shares nothing with the
    code that lays out the cache, so one bug cannot agree with itself."""
    dev = case.device
    seq_lens = case.seq_lens.to(torch.int64)
    bs = case.k_cache.shape[1]
    starts = torch.zeros(seq_lens.numel() + 1, dtype=torch.int64, device=dev)
    starts[1:] = torch.cumsum(seq_lens, 0)
    seq = torch.repeat_interleave(torch.arange(seq_lens.numel(), device=dev), seq_lens)
    pos = torch.arange(int(starts[-1]), device=dev) - starts[seq]
    block = case.block_table[seq, pos // bs].to(torch.int64)
    return case.k_cache[block, pos % bs], case.v_cache[block, pos % bs], starts
