"""Stand-ins for the FlashAttention libraries, written from their documented contracts (FA2's
flash_attn_varlen_func, FA3's flash_attn_with_kvcache, FA4's flash_attn.cute varlen function, vLLM's
build of FA2/FA3 and torch's varlen_attn of 2.11 and of later versions), so the adapters'
translation of a Case is tested on CPU, where none of these libraries runs.

The contract: query i of a sequence with sq queries and sk keys sees key j iff
i + sk - sq - left <= j <= i + sk - sq + right (a negative bound is unbounded, causal sets
right = 0); softcap * tanh(scale * qk / softcap); query head h reads KV head h // (Hq / Hkv); a
sink is one more logit per head with no value; LSE natural-log, [Hq, T].
"""
import types

import torch


def attend(q, k_cache, v_cache, cu_q, kv_lens, block_table, scale, causal, window, softcap, sinks=None):
    cu_q, kv_lens = cu_q.tolist(), kv_lens.tolist()
    left, right = window
    right = 0 if causal else right
    t, hq, _ = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out, lse = torch.empty_like(q), torch.empty(hq, t)
    for b, sk in enumerate(kv_lens):
        s, e = cu_q[b], cu_q[b + 1]
        sq, pos = e - s, torch.arange(sk)
        page = block_table[b, pos // bs].long()
        k = k_cache[page, pos % bs].double().repeat_interleave(hq // hkv, 1)
        v = v_cache[page, pos % bs].double().repeat_interleave(hq // hkv, 1)
        logits = torch.einsum("qhd,khd->hqk", q[s:e].double(), k) * (scale or q.shape[-1] ** -0.5)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        i, j = torch.arange(sq)[:, None] + sk - sq, pos[None, :]
        visible = torch.ones(sq, sk, dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        logits = logits.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            logits = torch.cat([logits, sinks.double()[:, None, None].expand(-1, sq, 1)], -1)
        lse[:, s:e] = torch.logsumexp(logits, -1).float()
        p = torch.softmax(logits, -1)[..., :sk]
        out[s:e] = torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)
    return out, lse


def _fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                return_attn_probs=False, block_table=None):
    out, lse = attend(q, k, v, cu_seqlens_q, cu_seqlens_k.diff(), block_table, softmax_scale, causal, window_size,
                      softcap)
    return (out, lse, torch.empty(0)) if return_attn_probs else out


def _fa3_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                 cache_batch_idx=None, cache_leftpad=None, page_table=None, cu_seqlens_q=None, cu_seqlens_k_new=None,
                 max_seqlen_q=None, rotary_seqlens=None, q_descale=None, k_descale=None, v_descale=None,
                 softmax_scale=None, causal=False, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                 rotary_interleaved=True, scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                 return_softmax_lse=False):
    assert max_seqlen_q is not None, "max_seqlen_q must be provided if cu_seqlens_q is provided"
    out, lse = attend(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, page_table, softmax_scale, causal,
                      window_size, softcap)
    return (out, lse, None, None) if return_softmax_lse else out


def _fa4_varlen(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
                softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0,
                num_splits=1, pack_gqa=None, deterministic=False, score_mod=None, return_lse=False, **rest):
    assert cu_seqlens_k is None, "page_table is not supported with cu_seqlens_k"
    window = tuple(-1 if w is None else w for w in window_size)
    out, lse = attend(q, k, v, cu_seqlens_q, seqused_k, page_table, softmax_scale, causal, window, softcap,
                      learnable_sink)
    return out, (lse if return_lse else None)


def _vllm_varlen(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None, q_v=None,
                 dropout_p=0.0, softmax_scale=None, causal=False, window_size=None, softcap=0.0, alibi_slopes=None,
                 deterministic=False, return_attn_probs=False, block_table=None, return_softmax_lse=False, out=None,
                 scheduler_metadata=None, q_descale=None, k_descale=None, v_descale=None, num_splits=0,
                 output_scale=None, fa_version=2, s_aux=None, **rest):
    """vllm.vllm_flash_attn.flash_attn_varlen_func (vLLM 0.26 to 0.33), FA2 and FA3."""
    assert cu_seqlens_k is not None or seqused_k is not None, "cu_seqlens_k or seqused_k must be provided"
    assert block_table is None or seqused_k is not None, "seqused_k must be provided if block_table is provided"
    assert window_size is None or len(window_size) == 2
    if fa_version == 2 and s_aux is not None:
        raise NotImplementedError("FA2 does not support s_aux")
    if s_aux is not None and s_aux.dtype != torch.bfloat16:  # its FA3 extension's check
        raise RuntimeError("We only support bf16 dtype for S aux.")
    out, lse = attend(q, k, v, cu_seqlens_q, seqused_k, block_table, softmax_scale, causal,
                      tuple(window_size or (-1, -1)), softcap, s_aux)
    return (out, lse) if return_softmax_lse else out


def _ragged_as_pages(key, value, cu_seq_k):
    """Packed [N, Hkv, D] keys as a cache of one-slot pages, with the block table that reads them."""
    lens = cu_seq_k.diff()
    table = torch.zeros(lens.numel(), int(lens.max()), dtype=torch.int64)
    for b, (start, n) in enumerate(zip(cu_seq_k.tolist(), lens.tolist())):
        table[b, :n] = torch.arange(start, start + n)
    return key[:, None], value[:, None], lens, table


def varlen_attn_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
    k, v, lens, table = _ragged_as_pages(key, value, cu_seq_k)
    out, lse = attend(query, k, v, cu_seq_q, lens, table, scale, window_size == (-1, 0), window_size, 0.0)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def varlen_attn_paged(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa or query.shape[1] == key.shape[2], "Try setting enable_gqa=True for GQA"
    assert block_table is None or seqused_k is not None, "block_table requires seqused_k"
    out, lse = attend(query, key, value, cu_seq_q, seqused_k, block_table, scale, window_size == (-1, 0), window_size,
                      0.0)
    return (out, lse) if return_aux is not None and return_aux.lse else out


MODULES = {
    "fake_flash_attn": types.SimpleNamespace(flash_attn_varlen_func=_fa2_varlen),
    "fake_flash_attn_interface": types.SimpleNamespace(flash_attn_with_kvcache=_fa3_kvcache),
    "fake_flash_attn_cute": types.SimpleNamespace(flash_attn_varlen_func=_fa4_varlen),
    "fake_vllm_flash_attn": types.SimpleNamespace(flash_attn_varlen_func=_vllm_varlen),
}
