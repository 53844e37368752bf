"""A plain-torch paged-attention adapter, written independently of the reference, and its mutants:
each switches on one real bug class. The self-tests assert the suite catches every mutant."""
from __future__ import annotations

import dataclasses
import math

import torch

from conformance import Backend, Capabilities, Case, scatter_to_cache
from conformance.paged import quantize
from conformance.reference import to_tf32
from conformance.registry import ALL_FEATURES, ALL_KV_LAYOUTS

BUGS = {
    "top_left_causal": "causal mask aligned top-left (SDPA is_causal=True with q_len != kv_len)",
    "block_table_ignored": "pages assumed contiguous from the sequence's first block",
    "first_block_only": "only the first block of the table used, wrapping around it",
    "last_token_dropped": "the last key of each sequence is not read",
    "read_past_end": "one key past seq_len is read",
    "last_block_len_wrong": "the last block read as if it were full",
    "gqa_modulo": "query head h reads KV head h % kv_heads instead of h // group",
    "scale_ignored": "softmax scale taken as 1",
    "window_off_by_one": "sliding window admits one key too many",
    "softcap_ignored": "logit softcap not applied",
    "rows_unwritten": "the last output row of each sequence is never written",
    "k_v_swapped": "K and V caches swapped",
    "new_tokens_not_written": "the new tokens' K/V never reach the cache",
    "query_offsets_shifted": "query start offsets shifted by one token",
    "sinks_ignored": "attention sinks left out of the softmax",
    "fp8_scale_ignored": "fp8 cache codes read without their scale",
    "layout_ignored": "the cache's memory read as separate NHD caches whatever its layout",
    "naive_softmax": "softmax without the row max subtracted (exp overflows at large logits)",
    "decode_rows_by_sequence": "a decode batch's query and output rows indexed by sequence number",
    "int32_offsets": "element offsets into the cache computed in 32 bits (wrap past 2^31 elements)",
    "lse_base2": "LSE returned in base 2 (FlashInfer's convention) instead of natural log",
    "shared_block_written": "each new token's K/V written into its sequence's first block (a shared prompt's), "
                            "at its own in-block offset",
    "decode_scale": "decode calls (one new token per sequence) scale the logits 10% more than prefill calls",
    "batch_dependent_split": "keys reduced in as many splits as the call has sequences, each split's partial "
                             "output rounded to the dtype (it declares bit-exact batch invariance)",
    "run_to_run_noise": "one output value of each call one ULP up, a different one each call (a reduction with "
                        "atomics), while it declares bit-exact runs",
    "chunks_forgotten": "a sequence attends the context it had when it first came, then only the new tokens of "
                        "the current call: the earlier chunks are forgotten",
    "graph_keeps_seq_lens": "the prepared (captured) call keeps a copy of the first batch's sequence lengths",
    "batch_wide_q_scale": "queries divided and multiplied back by one scale from every query row of the call, "
                          "padding rows included (as a per-tensor fp8 quantization of q computes it)",
    "tf32_matmuls": "fp32 cases: Q.K and P.V on operands cut to TF32 (Triton's default tl.dot), undeclared "
                    "(Capabilities.fp32_precision)",
}
# Bugs that only cases outside the cpu profile can show (its caches are megabytes): those cases.
NEEDS = {"int32_offsets": "far_pages"}


class PagedTorch(Backend):
    description = "plain torch, per sequence, keys read through the block table (self-test adapter)"
    # Each sequence alone, in float64: the same bits in any batch and on every run. It runs on the
    # CPU only (its indices live there; its graph replays are the prepared call called again: graphs.py).
    capabilities = Capabilities(devices=frozenset({"cpu"}), kv_dtypes=frozenset({"auto", "fp8_e4m3"}),
                                features=ALL_FEATURES, kv_layouts=ALL_KV_LAYOUTS, returns_lse=True,
                                bit_exact=frozenset({"batch", "run_to_run"}), cuda_graphs=True)

    def __init__(self, bug: str | None = None):
        assert bug is None or bug in BUGS, bug
        self.bug = bug
        self.name = f"mutant-{bug.replace('_', '-')}" if bug else "paged-torch"

    def write_cache(self, case: Case) -> None:
        if self.bug == "shared_block_written":
            bs = case.k_cache.shape[1]
            seq = torch.repeat_interleave(torch.arange(case.seq_lens.numel()), case.query_start_loc.diff())
            at = (case.block_table[seq, 0].long(), case.slot_mapping % bs)
            case.k_cache[at] = quantize(case.k_new, case.k_scale, case.k_cache.dtype)
            case.v_cache[at] = quantize(case.v_new, case.v_scale, case.v_cache.dtype)
        elif self.bug != "new_tokens_not_written":
            scatter_to_cache(case)

    def prepare(self, case: Case):
        if self.bug == "graph_keeps_seq_lens":
            kept = dataclasses.replace(case, seq_lens=case.seq_lens.clone(), context_lens=case.context_lens.clone())
            return lambda: self.run(kept)
        return super().prepare(case)

    def run(self, case: Case):
        spec, bug = case.spec, self.bug
        nb, bs, hkv, d = case.k_cache.shape
        k_cache, v_cache = _as_nhd_memory(case) if bug == "layout_ignored" else (case.k_cache, case.v_cache)
        if bug == "k_v_swapped":
            k_cache, v_cache = v_cache, k_cache
        k_scale, v_scale = (1.0, 1.0) if bug == "fp8_scale_ignored" else (case.k_scale, case.v_scale)
        g = spec.heads.group_size
        heads = torch.arange(spec.heads.num_q_heads)
        kv_head = heads % hkv if bug == "gqa_modulo" else heads // g
        qsl = case.query_start_loc.tolist()
        if bug == "decode_rows_by_sequence" and case.max_query_len == 1:
            qsl = list(range(len(qsl)))
        queries = case.q.double()
        if bug == "batch_wide_q_scale":
            scale_q = queries.abs().amax()
            queries = queries / scale_q * scale_q
        lse = torch.full(case.out.shape[:2], float("nan"), dtype=torch.float32)
        for b, (s, ctx) in enumerate(zip(case.seq_lens.tolist(), case.context_lens.tolist())):
            n = {"last_token_dropped": s - 1, "read_past_end": s + 1,
                 "last_block_len_wrong": -(-s // bs) * bs}.get(bug, s)
            pos = torch.arange(n)
            if bug == "block_table_ignored":
                slots = int(case.block_table[b, 0]) * bs + pos
            elif bug == "first_block_only":
                slots = int(case.block_table[b, 0]) * bs + pos % bs
            else:
                slots = case.block_table[b, pos // bs].long() * bs + pos % bs
            k = _read(k_cache, slots, bug).double()[:, kv_head] * k_scale  # [n, Hq, D]
            v = _read(v_cache, slots, bug).double()[:, kv_head] * v_scale
            q0, q1 = qsl[b], qsl[b + 1]
            if bug == "query_offsets_shifted":
                q0, q1 = min(q0 + 1, case.q.shape[0] - (q1 - q0)), min(q1 + 1, case.q.shape[0])
            q = queries[q0:q1]
            scale = 1.0 if bug == "scale_ignored" else spec.scale
            if bug == "decode_scale" and case.max_query_len == 1:
                scale *= 1.1
            tf32 = bug == "tf32_matmuls" and spec.dtype == torch.float32
            cut = (lambda x: to_tf32(x).double()) if tf32 else (lambda x: x)  # noqa: E731
            logits = torch.einsum("qhd,khd->hqk", cut(q), cut(k)) * scale
            if spec.softcap is not None and bug != "softcap_ignored":
                logits = spec.softcap * torch.tanh(logits / spec.softcap)
            qpos = torch.arange(q1 - q0)[:, None] + (0 if bug == "top_left_causal" else ctx)
            kpos = pos[None, :]
            visible = torch.ones(q1 - q0, n, dtype=torch.bool)
            if spec.causal:
                visible &= kpos <= qpos
            if spec.sliding_window is not None:
                visible &= (qpos - kpos <= spec.sliding_window) if bug == "window_off_by_one" \
                    else (qpos - kpos < spec.sliding_window)
            if bug == "chunks_forgotten":  # the context at a sequence's first call, kept with the cache
                first_seen = case.k_cache.__dict__.setdefault("first_context", {})
                admitted = first_seen.setdefault(tuple(case.block_table[b].tolist()), ctx)
                visible &= (kpos < admitted) | (kpos >= ctx)
            logits = logits.masked_fill(~visible, float("-inf"))
            if case.sinks is not None and bug != "sinks_ignored":  # one more logit, with a zero value row
                logits = torch.cat([logits, case.sinks.double()[:, None, None].expand(-1, q1 - q0, 1)], -1)
                v = torch.cat([v, torch.zeros_like(v[:1])])
            if bug == "naive_softmax":
                p = torch.exp(logits)
                p = p / p.sum(-1, keepdim=True)
            else:
                p = torch.softmax(logits, -1)
            out = torch.einsum("hqk,khd->qhd", cut(p), cut(v))
            if bug == "batch_dependent_split":
                out = _split_reduction(logits, v, len(qsl) - 1, case.out.dtype)
            rows = slice(qsl[b], qsl[b + 1] - (1 if bug == "rows_unwritten" else 0))
            case.out[rows] = out[: rows.stop - rows.start].to(case.out.dtype)
            lse[rows] = torch.logsumexp(logits, -1).T[: rows.stop - rows.start].float()
        if bug == "run_to_run_noise":  # the next float up, at a place that moves with every call
            self.calls = getattr(self, "calls", 0) + 1
            bits = case.out.view({2: torch.int16, 4: torch.int32}[case.out.element_size()]).view(-1)
            bits[self.calls % bits.numel()] += 1
        return case.out, lse / math.log(2) if bug == "lse_base2" else lse


def _split_reduction(logits: torch.Tensor, v: torch.Tensor, splits: int, dtype: torch.dtype) -> torch.Tensor:
    """Softmax(logits) @ v over `splits` runs of keys, each run's output rounded to `dtype` and the
    runs merged by their log-sum-exp: a split-KV kernel whose partials are stored in the output dtype."""
    lse = torch.logsumexp(logits, -1)  # [H, q]
    out = 0
    for part_logits, part_v in zip(logits.chunk(splits, -1), v[:logits.shape[-1]].chunk(splits, 0)):
        part_lse = torch.logsumexp(part_logits, -1)
        part = torch.einsum("hqk,khd->qhd", torch.softmax(part_logits, -1), part_v).to(dtype).double()
        out = out + torch.nan_to_num(part) * torch.exp(part_lse - lse).T[..., None]
    return out


def _read(cache: torch.Tensor, slots: torch.Tensor, bug: str | None) -> torch.Tensor:
    """The keys (or values) of `slots`, [n, Hkv, D], from a [num_blocks, block_size, Hkv, D] cache."""
    bs = cache.shape[1]
    if bug != "int32_offsets" or not cache.is_contiguous():  # the bug as an NHD kernel has it
        return cache[slots // bs, slots % bs]
    row = cache.shape[2] * cache.shape[3]  # elements per slot
    start = (slots * row + 2**31) % 2**32 - 2**31  # the int32 product: wraps past 2^31
    index = start[:, None] % cache.numel() + torch.arange(row)
    return cache.reshape(-1)[index].view(-1, *cache.shape[2:])


def _as_nhd_memory(case: Case):
    """The layout_ignored bug: memory taken as vLLM's default, whatever spec.kv_layout says."""
    stored = case.stored_cache()
    shape = case.k_cache.shape
    if isinstance(stored, tuple):
        return tuple(x.reshape(shape) for x in stored)  # [blocks, Hkv, bs, D] memory indexed as [blocks, bs, Hkv, D]
    flat = stored.reshape(2, *shape)  # [blocks, 2, ...] (K and V of each page together) taken as [2, blocks, ...]
    return flat[0], flat[1]
