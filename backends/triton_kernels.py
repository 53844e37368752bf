"""Our Triton paged attention: one kernel for prefill and decode, a split-KV reduce, a cache write.

Layout (vLLM's): caches [num_blocks, block_size, Hkv, D], block_table [B, max_blocks], queries
packed [T, Hq, D] with query_start_loc [B + 1]. A program owns BLOCK_Q query tokens of one
sequence times the GROUP query heads of one KV head (BLOCK_M = BLOCK_Q * GROUP rows, row r is
token r // GROUP, head r % GROUP), so each K/V tile is read once for the whole group. Keys are
walked in tiles of TILE positions; each key finds its page through the block table on its own,
so any block size works (1, 48, ...) and pages need not be contiguous.

Split-KV: with NUM_SEGMENTS > 1, a third grid axis cuts each program's key range into segments
that write unnormalised partials (running max, sum, accumulator); _reduce_segments_kernel merges
them. Without it, the kernel normalises and writes the output directly.

Softmax runs in base 2 (log2(e) folded into the scale), statistics and accumulator in fp32.
Importing this module needs triton; on a machine without CUDA it runs under Triton's interpreter
(TRITON_INTERPRET=1, which importing `conformance` sets there).
"""
import torch
import triton
import triton.language as tl

# Literals in the kernels: 1.4426950408889634 = log2(e), 0.6931471805599453 = ln(2).


@triton.jit
def _find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks contain the global query-block index q_block. Sequence i's
    blocks start at query_start_loc[i] // BLOCK_Q + i (each has at most len // BLOCK_Q + 1), so
    the grid needs no host-side count: an upper bound of T // BLOCK_Q + B programs suffices."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attention_kernel(
    out_ptr, lse_ptr,  # NUM_SEGMENTS == 1: out [T, Hq, D], lse [T, Hq]; else partial acc, (max, sum) per segment
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr, sinks_ptr,
    num_seqs, num_q_heads, block_size, window, scale, k_scale, v_scale, softcap,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head, stride_bt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TILE: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr, NUM_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq = _find_sequence(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return  # a spare program of the upper-bound grid
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + rows // GROUP  # query index within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_len + q_idx  # absolute position: causal means key_pos <= q_pos (bottom-right)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q_off = (q_start + q_idx).to(tl.int64)[:, None] * stride_q_t + head[:, None] * stride_q_h + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys this program can see: [key_lo, key_hi). Tiles wholly before the window of the first
    # query, or after the last query (causal), are never visited.
    last_q = tl.minimum((q_block + 1) * BLOCK_Q, q_len) - 1
    key_hi = context_len + last_q + 1 if CAUSAL else seq_len
    key_lo = 0
    if USE_WINDOW:
        key_lo = tl.maximum(context_len + q_block * BLOCK_Q - window + 1, 0)
    tile_lo = key_lo // TILE
    tile_hi = (key_hi + TILE - 1) // TILE
    if NUM_SEGMENTS > 1:
        per_segment = (tile_hi - tile_lo + NUM_SEGMENTS - 1) // NUM_SEGMENTS
        tile_lo = tile_lo + segment * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, tile_hi)

    qk_scale = scale * 1.4426950408889634  # log2(e): exp2 below
    if USE_SINKS and NUM_SEGMENTS == 1:  # split runs add the sink once, in the reduce
        m = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        l = tl.where(row_ok, 1.0, 0.0).to(tl.float32)
    else:
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    for tile in range(tile_lo, tile_hi):
        k_pos = tile * TILE + tl.arange(0, TILE)
        k_ok = (k_pos >= key_lo) & (k_pos < key_hi)
        block = tl.load(block_table_ptr + seq * stride_bt + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
        slot = k_pos % block_size
        k_off = block[None, :] * stride_k_block + slot[None, :] * stride_k_slot + kv_head * stride_k_head + d[:, None]
        k = tl.load(k_cache_ptr + k_off, mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # [D, TILE]
        if KV_FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if USE_SOFTCAP:  # softcap * tanh(s * scale / softcap), tanh through exp2 (interpreter-safe)
            t = tl.exp2(s * (2.0 * qk_scale / softcap))
            s = softcap * 1.4426950408889634 * (1.0 - 2.0 / (t + 1.0))
        else:
            s = s * qk_scale
        visible = row_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m - shift)
        l = l * alpha + tl.sum(p, 1)
        v_off = block[:, None] * stride_v_block + slot[:, None] * stride_v_slot + kv_head * stride_v_head + d[None, :]
        v = tl.load(v_cache_ptr + v_off, mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [TILE, D]
        if KV_FP8:
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    token = (q_start + q_idx).to(tl.int64)
    row = token * num_q_heads + head  # row of the [T, Hq] lse / partial-statistics tensors
    if NUM_SEGMENTS == 1:
        seen = l > 0
        l_safe = tl.where(seen, l, 1.0)
        o_off = token[:, None] * stride_o_t + head[:, None] * stride_o_h + d[None, :]
        tl.store(out_ptr + o_off, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + row, tl.where(seen, (m + tl.log2(l_safe)) * 0.6931471805599453, float("-inf")), mask=row_ok)
    else:
        # Partials, fp32: acc [T, Hq, S, D_PAD] unnormalised, stats [T, Hq, S, 2] = (max in base 2, sum).
        part = row * NUM_SEGMENTS + segment
        tl.store(out_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_ok[:, None])
        tl.store(lse_ptr + part * 2, m, mask=row_ok)
        tl.store(lse_ptr + part * 2 + 1, l, mask=row_ok)


@triton.jit
def _reduce_segments_kernel(
    out_ptr, lse_ptr, acc_ptr, stats_ptr, sinks_ptr, num_q_heads, stride_o_t, stride_o_h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SEGMENTS: tl.constexpr, USE_SINKS: tl.constexpr,
):
    """Merge one (token, head)'s segment partials: rescale each to the common max and normalise.
    The sink joins here, once, as one more logit with no value."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = token * num_q_heads + head
    seg = tl.arange(0, NUM_SEGMENTS)
    d = tl.arange(0, HEAD_DIM_PAD)
    m = tl.load(stats_ptr + (row * NUM_SEGMENTS + seg) * 2)
    l = tl.load(stats_ptr + (row * NUM_SEGMENTS + seg) * 2 + 1)
    m_all = tl.max(m, 0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_all, sink)
    shift = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - shift)  # 0 for a segment that saw no key (m = -inf)
    total = tl.sum(l * w, 0)
    if USE_SINKS:
        total += tl.exp2(sink - shift)
    acc = tl.load(acc_ptr + (row * NUM_SEGMENTS + seg)[:, None] * HEAD_DIM_PAD + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)
    lse = tl.where(total > 0, (shift + tl.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _round_to_e4m3(x):
    """x (fp32) rounded to the nearest e4m3 value, ties to even, saturating at +-448: what a cast
    to float8_e4m3fn should do. Done in fp32 arithmetic, so the cast after it is exact everywhere:
    Triton's interpreter rounds fp8 casts half-up and drops the carry into the exponent."""
    bits = x.to(tl.int32, bitcast=True)
    a = tl.minimum(tl.abs(x), 448.0)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3 subnormals share the spacing of [2^-6, 2^-5)
    # Adding 1.5 * 2^(exponent + 20) leaves fp32 a spacing of 2^(exponent - 3), e4m3's own
    # (3 mantissa bits): IEEE addition does the round-to-nearest-even, the subtraction is exact.
    magic = (((exponent + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    a = (a + magic) - magic
    # x's sign bit back on: -a would be 0 - a on the GPU, turning -0.0 into +0.0.
    return (a.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _write_cache_kernel(
    k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale, v_scale,
    block_size, stride_new_t, stride_cache_block, stride_cache_slot, stride_cache_head,
    ROW: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, KV_FP8: tl.constexpr,
):
    """New token t's K/V ([Hkv, D], contiguous, ROW elements) into its slot, head by head through
    the cache's strides (any layout); slot -1 is a padding token (vLLM's convention) and is
    skipped. fp8: code = RNE(fp32(x) / scale), IEEE division."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    i = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    ok = i < ROW
    dst = ((slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_slot
           + (i // HEAD_DIM) * stride_cache_head + i % HEAD_DIM)
    k = tl.load(k_new_ptr + t * stride_new_t + i, mask=ok)
    v = tl.load(v_new_ptr + t * stride_new_t + i, mask=ok)
    if KV_FP8:
        k = _round_to_e4m3(tl.math.div_rn(k.to(tl.float32), k_scale))
        v = _round_to_e4m3(tl.math.div_rn(v.to(tl.float32), v_scale))
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, max_query_len, out, *,
                    scale, causal=True, window=None, softcap=None, sinks=None, k_scale=1.0, v_scale=1.0,
                    num_segments=1):
    """Attention of packed queries over the paged cache into `out`; returns the LSE [T, Hq] (natural log).

    q/out [T, Hq, D]; caches indexed [num_blocks, block_size, Hkv, D] (fp8 e4m3 codes, or q's dtype;
    any strides but the last, so "HND" and combined layouts are views);
    window: keys with q_pos - k_pos < window are visible; sinks: [Hq] logits; num_segments > 1
    (a power of two) takes the split-KV path.
    """
    T, hq, dim = q.shape
    _, block_size, hkv, _ = k_cache.shape
    for ok, field, value, rule in (
        (num_segments >= 1 and num_segments & (num_segments - 1) == 0, "num_segments", num_segments,
         "must be a power of two"),
        (hq % hkv == 0, "k_cache.shape[2]", hkv, f"must divide the query heads ({hq})"),
        (k_cache.dtype in (q.dtype, torch.float8_e4m3fn) and v_cache.dtype == k_cache.dtype, "k_cache.dtype",
         k_cache.dtype, f"must be q's dtype ({q.dtype}) or float8_e4m3fn, and v_cache's"),
        (dim <= 256 and k_cache.shape[3] == dim, "head_dim", dim, "must be <= 256 and the same in q and the caches"),
        (k_cache.stride(3) == v_cache.stride(3) == 1, "k_cache/v_cache.stride(3)", (k_cache.stride(3), v_cache.stride(3)),
         "must be 1 (contiguous head dim; other dims may be strided)"),
    ):
        if not ok:
            raise ValueError(f"paged_attention: {field} = {value}: {rule}")
    num_seqs = seq_lens.numel()
    group = hq // hkv
    # Rows of a program: BLOCK_Q tokens x GROUP heads, at least 16 (tl.dot's minimum); decode
    # programs hold one token per sequence, so they stay small. Tiles sized so that nothing spills
    # on sm_90 (at most 120 bytes a thread; `cuobjdump -res-usage`): fp32 at "ieee" precision runs
    # on CUDA cores and spilled 8-22 KB a thread at 64 x 32, which the driver keeps as local memory
    # for every thread the GPU can hold (5.3 GiB a process on an H200). Under the interpreter (CPU
    # tensors) registers do not exist and each tile step costs Python time: bigger tiles there.
    dim_pad = max(16, triton.next_power_of_2(dim))
    if not q.is_cuda:
        rows, tile = (16 if max_query_len == 1 else 64), (64 if dim_pad <= 128 else 32)
    elif q.dtype == torch.float32:
        rows, tile = 16, 16
    else:
        rows, tile = (16 if max_query_len == 1 else 64 if dim_pad <= 128 else 32), 32
    block_m = max(rows, triton.next_power_of_2(group))
    block_q = block_m // group
    lse = torch.empty(T, hq, dtype=torch.float32, device=q.device)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if num_segments == 1:
        dst, stats = out, lse
    else:
        dst = torch.empty(T, hq, num_segments, dim_pad, dtype=torch.float32, device=q.device)
        stats = torch.empty(T, hq, num_segments, 2, dtype=torch.float32, device=q.device)
    grid = (T // block_q + num_seqs, hkv, num_segments)
    _attention_kernel[grid](
        dst, stats, q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
        sinks if sinks is not None else q,  # never read without USE_SINKS
        num_seqs, hq, block_size, window or 0, scale, k_scale, v_scale, softcap or 1.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=dim, HEAD_DIM_PAD=dim_pad,
        TILE=tile, CAUSAL=causal, USE_WINDOW=window is not None, USE_SOFTCAP=softcap is not None,
        USE_SINKS=sinks is not None, KV_FP8=fp8, NUM_SEGMENTS=num_segments,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 cases must not round to tf32
    )
    if num_segments > 1:
        _reduce_segments_kernel[(T, hq)](
            out, lse, dst, stats, sinks if sinks is not None else q, hq, out.stride(0), out.stride(1),
            HEAD_DIM=dim, HEAD_DIM_PAD=dim_pad, NUM_SEGMENTS=num_segments, USE_SINKS=sinks is not None,
        )
    return lse


def write_cache(k_new, v_new, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    """Scatter new tokens' K/V [T, Hkv, D] into their cache slots (quantizing for an fp8 cache).
    The caches are indexed [block, slot, head, dim] with any strides but a contiguous last dim
    (so "HND" and combined layouts are views), the same strides for K and V."""
    T, hkv, dim = k_new.shape
    for ok, field, value, rule in (
        (k_new.is_contiguous() and v_new.is_contiguous(), "k_new/v_new", "strided", "must be contiguous"),
        (k_cache.stride() == v_cache.stride(), "v_cache.stride()", v_cache.stride(),
         f"must equal k_cache.stride() = {k_cache.stride()}"),
        (k_cache.stride(3) == 1, "k_cache.stride(3)", k_cache.stride(3), "must be 1 (contiguous head dim)"),
    ):
        if not ok:
            raise ValueError(f"write_cache: {field} = {value}: {rule}")
    row = hkv * dim
    chunk = min(1024, triton.next_power_of_2(row))
    _write_cache_kernel[(T, triton.cdiv(row, chunk))](
        k_new, v_new, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        k_cache.shape[1], k_new.stride(0), *k_cache.stride()[:3],
        ROW=row, HEAD_DIM=dim, CHUNK=chunk, KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
    )
