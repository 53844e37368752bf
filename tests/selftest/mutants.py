"""A plain-torch paged-attention adapter, written independently of the reference, and its mutants:
each switches on one real bug class. The self-tests assert the suite catches every mutant."""
from __future__ import annotations

import torch

from conformance import Backend, Capabilities, Case, scatter_to_cache
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
}


class PagedTorch(Backend):
    description = "plain torch, per sequence, keys read through the block table (self-test adapter)"
    capabilities = Capabilities(kv_dtypes=frozenset({"auto", "fp8_e4m3"}), features=ALL_FEATURES,
                                kv_layouts=ALL_KV_LAYOUTS)

    def __init__(self, bug: str | None = None):
        assert bug is None or bug in BUGS, bug
        self.bug = bug
        self.name = f"mutant-{bug.replace('_', '-')}" if bug else "paged-torch"

    def write_cache(self, case: Case) -> None:
        if self.bug != "new_tokens_not_written":
            scatter_to_cache(case)

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
            k = k_cache[slots // bs, slots % bs].double()[:, kv_head] * k_scale  # [n, Hq, D]
            v = v_cache[slots // bs, slots % bs].double()[:, kv_head] * v_scale
            q0, q1 = qsl[b], qsl[b + 1]
            if bug == "query_offsets_shifted":
                q0, q1 = min(q0 + 1, case.q.shape[0] - (q1 - q0)), min(q1 + 1, case.q.shape[0])
            q = case.q[q0:q1].double()
            scale = 1.0 if bug == "scale_ignored" else spec.scale
            logits = torch.einsum("qhd,khd->hqk", q, k) * scale
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
            logits = logits.masked_fill(~visible, float("-inf"))
            if case.sinks is not None and bug != "sinks_ignored":  # one more logit, with a zero value row
                logits = torch.cat([logits, case.sinks.double()[:, None, None].expand(-1, q1 - q0, 1)], -1)
                v = torch.cat([v, torch.zeros_like(v[:1])])
            out = torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), v)
            rows = slice(qsl[b], qsl[b + 1] - (1 if bug == "rows_unwritten" else 0))
            case.out[rows] = out[: rows.stop - rows.start].to(case.out.dtype)
        return case.out


def _as_nhd_memory(case: Case):
    """The layout_ignored bug: memory taken as vLLM's default, whatever spec.kv_layout says."""
    stored = case.stored_cache()
    shape = case.k_cache.shape
    if isinstance(stored, tuple):
        return tuple(x.reshape(shape) for x in stored)  # [blocks, Hkv, bs, D] memory indexed as [blocks, bs, Hkv, D]
    flat = stored.reshape(2, *shape)  # [blocks, 2, ...] (K and V of each page together) taken as [2, blocks, ...]
    return flat[0], flat[1]
