"""Ground truth: attention over the logical (unpaged) K/V, independent of every backend.

It reads the harness's own packed K/V, never the paged cache, builds every mask explicitly
(bottom-right causal: query i of a sequence with context c sees keys 0..c+i; sliding window;
key padding), maps query head h to KV head h // group, and computes in float64 by default.
An fp8 cache's keys are what the cache holds: the codes times their scale. A sink is one more
logit in every row's softmax, with no value: the running max starts at it with a sum of 1.
Sequences are padded into one batch (no per-sequence Python loop) and keys are processed in
chunks with an online softmax, so memory stays bounded for long contexts.

precision="lowp" runs the same math the way a fused kernel in the case's dtype would (scores and
probabilities rounded to the dtype, fp32 statistics, output rounded): the noise level that
calibrates the tolerance. precision="tf32" (fp32 cases of a backend that declares
Capabilities.fp32_precision = "tf32") runs it as a kernel whose matmuls take TF32 operands: Q, K,
P and V cut to TF32's 10-bit mantissa, the products accumulated and the scores kept in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .paged import Inputs, dequantize

# Elements of one chunk's scores (and of its keys); bounds the reference's memory (128 MiB each in float64).
SCORE_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Reference:
    out: torch.Tensor  # [T, Hq, D]
    lse: torch.Tensor  # [T, Hq], natural log, sink included; -inf for a row that sees nothing (its out is 0)


def dense_reference(inputs: Inputs, precision: str = "float64") -> Reference:
    """A dense case's attention, in float64 (the truth) or "lowp" (as a kernel in the case's dtype would)."""
    spec = inputs.spec
    acc_dtype, rnd = precision_of(spec, precision)
    rnd_scores = (lambda x: x) if precision == "tf32" else None  # a TF32 matmul's products are fp32

    def keys(rows):  # keys and values as the cache holds them, for a low-precision kernel in the case's dtype
        return tuple(rnd(dequantize(inputs.stored(which, rows), scale, acc_dtype))
                     for which, scale in (("k", inputs.k_scale), ("v", inputs.v_scale)))

    out, lse = attend(spec, rnd(inputs.q.to(acc_dtype)), keys, inputs.kv_start_loc, spec.heads.num_kv_heads,
                      spec.heads.head_dim, rnd, inputs.sinks, rnd_scores=rnd_scores)
    return Reference(out=out if precision == "float64" else out.to(spec.dtype), lse=lse)


def precision_of(spec, precision: str):
    """(accumulation dtype, rounding function) of a reference precision: "float64" computes exactly
    enough; "lowp" rounds where a kernel in the case's dtype would, with fp32 statistics; "tf32"
    cuts fp32 values to TF32 (to_tf32)."""
    if precision not in ("float64", "lowp", "tf32"):
        raise ValueError(f"precision = {precision!r}: must be 'float64', 'lowp' or 'tf32'")
    if precision == "float64":
        return torch.float64, lambda x: x
    if precision == "tf32":
        return torch.float32, to_tf32
    return torch.float32, lambda x: x.to(spec.dtype).to(torch.float32)


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values as a tensor core reads them in TF32: the low 13 of the 23 mantissa bits dropped
    (truncated: what it does with an fp32 register; a kernel that rounds to nearest first is less
    noisy, and judged by the same, looser, model)."""
    return (x.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


def attend(spec, q: torch.Tensor, keys, kv_start_loc: torch.Tensor, hkv: int, v_dim: int, rnd, sinks=None,
           allowed=None, rnd_scores=None):
    """Attention of the packed queries q [T, Hq, Dqk] (already in the accumulation dtype) over each
    sequence's keys, as spec's batch, scale and masks say. keys(rows) gives (k [B, C, Hkv, Dqk],
    v [B, C, Hkv, v_dim]) of the packed rows [B, C], in the accumulation dtype. rnd rounds the
    scores and probabilities as a low-precision kernel would (identity for float64); rnd_scores,
    if given, the scores instead. allowed [B, max_q, max_kv] (bool), if given: the only keys each
    query may see (sparse attention). Returns out [T, Hq, v_dim] and lse [T, Hq]."""
    b = spec.batch
    dev, acc_dtype = q.device, q.dtype
    # Fused kernels hold scores in fp32. Rounding them to the dtype models the rest, but at logits
    # near 1e4 a bf16 score is off by up to 32: the noise, and so the tolerance, would be O(1) and
    # the case could not fail. Extreme-logit cases keep the scores unrounded.
    rnd_cap = rnd_scores or rnd
    rnd_scores = rnd_scores or (rnd if spec.logit_std == 1.0 else (lambda x: x))
    B, (_, hq, dqk) = b.batch_size, q.shape
    g = hq // hkv
    max_q, max_kv = max(b.query_lens), max(b.seq_lens)
    seq_lens = torch.tensor(b.seq_lens, device=dev)
    query_lens = torch.tensor(b.query_lens, device=dev)
    ctx_lens = seq_lens - query_lens

    # Pad queries to [B, Hkv, G, max_q, Dqk] (head h = kv_head * G + g); keys are read per chunk.
    q_start = torch.zeros(B + 1, dtype=torch.int64, device=dev)
    q_start[1:] = torch.cumsum(query_lens, 0)
    q_seq = torch.repeat_interleave(torch.arange(B, device=dev), query_lens)
    q_pos = torch.arange(b.num_query_tokens, device=dev) - q_start[q_seq]
    q_pad = torch.zeros(B, max_q, hq, dqk, dtype=acc_dtype, device=dev)
    q_pad[q_seq, q_pos] = q
    q_pad = q_pad.view(B, max_q, hkv, g, dqk).permute(0, 2, 3, 1, 4)

    # Absolute position of each padded query row: context + i.
    qpos = (ctx_lens[:, None] + torch.arange(max_q, device=dev)[None, :])[:, None, None, :, None]

    m = torch.full((B, hkv, g, max_q), float("-inf"), dtype=acc_dtype, device=dev)
    row_sum = torch.zeros_like(m)
    if sinks is not None:
        m[:] = sinks.to(acc_dtype).view(1, hkv, g, 1)
        row_sum[:] = 1.0
    acc = torch.zeros(B, hkv, g, max_q, v_dim, dtype=acc_dtype, device=dev)
    # Chunk size: both the scores [B, Hq, max_q, C] and the keys read [B, C, Hkv, D] stay in budget.
    chunk = max(16, SCORE_CHUNK_ELEMENTS // max(B * hq * max_q, B * hkv * (dqk + v_dim)))
    kv_start, last_row = kv_start_loc[:-1, None], int(kv_start_loc[-1]) - 1
    for j0 in range(0, max_kv, chunk):
        j1 = min(max_kv, j0 + chunk)
        # Keys j0..j1 of every sequence, read from the packed K/V; rows past a sequence's end
        # borrow a neighbour's (finite) row and are masked below.
        rows = (kv_start + torch.arange(j0, j1, device=dev)[None, :]).clamp(max=last_row)  # [B, C]
        kc, vc = (x.permute(0, 2, 1, 3) for x in keys(rows))  # [B, Hkv, C, D]
        s = rnd_scores(torch.einsum("bhgqd,bhkd->bhgqk", q_pad, kc) * spec.scale)
        if spec.softcap is not None:
            s = rnd_cap(spec.softcap * torch.tanh(s / spec.softcap))
        kpos = torch.arange(j0, j1, device=dev)[None, None, None, None, :]
        visible = kpos < seq_lens[:, None, None, None, None]
        if spec.causal:
            visible = visible & (kpos <= qpos)
        if spec.sliding_window is not None:
            visible = visible & (qpos - kpos < spec.sliding_window)
        if allowed is not None:
            visible = visible & allowed[:, None, None, :, j0:j1]
        s = s.masked_fill(~visible, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
        p = torch.exp(s - shift[..., None])
        alpha = torch.exp(m - shift)
        row_sum = row_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhgqk,bhkd->bhgqd", rnd(p), vc)
        m = m_new

    seen = row_sum > 0
    safe_sum = torch.where(seen, row_sum, torch.ones_like(row_sum))
    out = torch.where(seen[..., None], acc / safe_sum[..., None], torch.zeros_like(acc))
    lse = torch.where(seen, m + torch.log(safe_sum), torch.full_like(m, float("-inf")))
    # Back to packed rows: [B, Hkv, G, max_q, ...] -> [T, Hq, ...].
    out = out.permute(0, 3, 1, 2, 4).reshape(B, max_q, hq, v_dim)[q_seq, q_pos]
    lse = lse.permute(0, 3, 1, 2).reshape(B, max_q, hq)[q_seq, q_pos]
    return out, lse
