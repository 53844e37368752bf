"""A stand-in for FlashMLA's `flash_mla` (flash_mla_interface.py), written from its documented
contract, so the `flashmla` adapter's translation of an MLA case is tested on CPU (FlashMLA runs
on neither machine of this project).

The contract: q [B, s_q, H_q, 576] (absorbed), k_cache [num_blocks, 64, H_k = 1, 576], block_table
[B, max_blocks] int32, cache_seqlens [B] int32, head_dim_v = 512 (the first 512 of each key are
its value); causal is bottom-right (query i of s_q sees keys 0..seqlen - s_q + i); softmax_scale
multiplies q . k. Returns out [B, s_q, H_q, 512] in q's dtype and lse [B, H_q, s_q] float32,
natural log, +inf for a row that sees no key. get_mla_metadata(cache_seqlens,
num_q_tokens_per_head_k, num_heads_k) returns (tile_scheduler_metadata, num_splits). The sparse
prefill kernel flash_mla_sparse_fwd: below.
"""
import importlib.machinery
import math
import types

import torch


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, *args, **kwargs):
    assert cache_seqlens.dtype == torch.int32 and num_heads_k == 1
    return ("metadata", num_q_tokens_per_head_k), torch.zeros(cache_seqlens.numel() + 1, dtype=torch.int32)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits, softmax_scale=None, causal=False, **kwargs):
    B, s_q, H, D = q.shape
    assert k_cache.dim() == 4 and k_cache.shape[1] == 64 and k_cache.shape[2] == 1 and k_cache.shape[3] == D
    assert block_table.dtype == cache_seqlens.dtype == torch.int32 and head_dim_v == 512
    assert tile_scheduler_metadata == ("metadata", s_q * H)
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    out = torch.empty(B, s_q, H, head_dim_v, dtype=q.dtype)
    lse = torch.empty(B, H, s_q, dtype=torch.float32)
    for b, n in enumerate(cache_seqlens.tolist()):
        pos = torch.arange(n)
        keys = k_cache[block_table[b, pos // 64].long(), pos % 64, 0].double()  # [n, 576]
        s = torch.einsum("qhd,nd->hqn", q[b].double(), keys) * scale
        if causal and s_q > 1:
            visible = pos[None, :] <= n - s_q + torch.arange(s_q)[:, None]
            s = s.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(s, -1)
        out[b] = torch.einsum("hqn,nv->qhv", torch.softmax(s, -1).nan_to_num(0.0), keys[:, :head_dim_v]).to(q.dtype)
        lse[b] = row_lse.masked_fill(row_lse.isneginf(), float("inf")).float()
    return out, lse


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
    """The sparse prefill kernel: q [s_q, h_q, d_qk] bf16 (h_q 64 or 128), kv [s_kv, h_kv = 1, d_qk]
    bf16, indices [s_q, h_kv, topk] int32 (-1 or >= s_kv: none). Returns (out [s_q, h_q, d_v] bf16,
    max_logits [s_q, h_q], lse [s_q, h_q] float32, log base 2)."""
    s_q, h_q, d_qk = q.shape
    assert q.dtype == kv.dtype == torch.bfloat16 and h_q in (64, 128) and kv.shape[1:] == (1, d_qk)
    assert indices.dtype == torch.int32 and indices.shape[:2] == (s_q, 1) and d_v == 512
    idx = indices[:, 0].long()
    valid = (idx >= 0) & (idx < kv.shape[0])
    keys = kv[idx.clamp(0, kv.shape[0] - 1), 0].double().masked_fill(~valid[..., None], 0.0)  # [s_q, topk, d_qk]
    s = (torch.einsum("qhd,qkd->qhk", q.double(), keys) * sm_scale).masked_fill(~valid[:, None, :], float("-inf"))
    out = torch.einsum("qhk,qkv->qhv", torch.softmax(s, -1), keys[..., :d_v]).to(q.dtype)
    return out, s.amax(-1).float(), (torch.logsumexp(s, -1) / math.log(2)).float()


MODULE = types.ModuleType("flash_mla")
MODULE.__spec__ = importlib.machinery.ModuleSpec("flash_mla", None)  # so find_spec sees it installed
MODULE.get_mla_metadata, MODULE.flash_mla_with_kvcache = get_mla_metadata, flash_mla_with_kvcache
MODULE.flash_mla_sparse_fwd = flash_mla_sparse_fwd
