"""Our Triton MLA decode: absorbed attention over the paged latent cache, split-KV.

The cache is [num_blocks, block_size, L + R] (kv_c then k_pe per token, vLLM's layout), or a split
one of bytes (fp8 codes with fp32 tile scales, k_pe in the queries' dtype: fp8_ds_mla); queries
are absorbed, [T, H, L + R] (q_nope @ W_UK, then q_pe). Every query head reads the same latent,
so a program owns BLOCK_H heads of one query token and reads each latent tile once for all of
them: scores = q_lat . kv_c + q_pe . k_pe, output = softmax . kv_c ([BLOCK_H, L]). Each key
finds its page through the block table on its own, so any block size works. Causal means
bottom-right: token i of a sequence with context c sees keys 0..c + i, so multi-token
(speculative) decode works too.

Split-KV: the third grid axis cuts each token's keys into NUM_SEGMENTS segments whose unnormalised
partials the dense kernels' reduce (triton_kernels._reduce_segments_kernel) merges. Softmax in
base 2, statistics and accumulator in fp32.
"""
import torch
import triton
import triton.language as tl

from conformance.backends.triton_kernels import _reduce_segments_kernel  # absolute: self-tests load edited copies of this file

SEGMENT_KEYS = 32  # at most about this many keys per segment ...
MAX_SEGMENTS = 16  # ... in at most this many segments


@triton.jit
def _mla_decode_kernel(
    acc_ptr, stats_ptr,  # partials: acc [T, H, S, L] fp32 unnormalised, stats [T, H, S, 2] (max base 2, sum)
    q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr, slots_ptr,
    num_seqs, num_heads, block_size, scale, kv_scale, topk,
    stride_q_t, stride_q_h, stride_c_block, stride_c_slot, stride_bt,
    LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr, TILE: tl.constexpr,
    KV_FP8: tl.constexpr, SCALE_TILE: tl.constexpr, SPARSE: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    segment = tl.program_id(2)
    # The sequence of this token: the last one whose queries start at or before it.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) <= token:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    q_pos = seq_len - q_len + (token - q_start)  # keys 0..q_pos are visible

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    c = tl.arange(0, LORA)
    r = tl.arange(0, ROPE)
    q_row = q_ptr + token.to(tl.int64) * stride_q_t + heads[:, None] * stride_q_h
    q_lat = tl.load(q_row + c[None, :], mask=h_ok[:, None], other=0.0)
    q_pe = tl.load(q_row + LORA + r[None, :], mask=h_ok[:, None], other=0.0)

    if SPARSE:  # the token's list of `topk` cache slots (-1: none) instead of its keys 0..q_pos
        num_tiles = (topk + TILE - 1) // TILE
    else:
        num_tiles = (q_pos + TILE) // TILE
    per_segment = (num_tiles + NUM_SEGMENTS - 1) // NUM_SEGMENTS
    tile_lo = segment * per_segment
    tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)

    qk_scale = scale * 1.4426950408889634  # log2(e): exp2 below
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, LORA], dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        if SPARSE:
            j = tile * TILE + tl.arange(0, TILE)
            slot = tl.load(slots_ptr + token.to(tl.int64) * topk + j, mask=j < topk, other=-1)
            k_ok = slot >= 0
            block = slot // block_size
            offset = slot % block_size
        else:
            k_pos = tile * TILE + tl.arange(0, TILE)
            k_ok = k_pos <= q_pos
            block = tl.load(block_table_ptr + seq * stride_bt + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
            offset = k_pos % block_size
        row = cache_ptr + block * stride_c_block + offset * stride_c_slot
        if SCALE_TILE:  # a split entry of bytes: fp8 codes, fp32 scales (one per SCALE_TILE codes), k_pe
            codes = tl.load(row[:, None] + c[None, :], mask=k_ok[:, None], other=0).to(tl.float8e4nv, bitcast=True)
            scales = tl.load((row + LORA).to(tl.pointer_type(tl.float32))[:, None] + (c // SCALE_TILE)[None, :],
                             mask=k_ok[:, None], other=0.0)
            kv = (codes.to(tl.float32) * scales).to(q_lat.dtype)  # [TILE, L]
            kpe = tl.load((row + LORA + 4 * (LORA // SCALE_TILE)).to(q_ptr.dtype)[:, None] + r[None, :],
                          mask=k_ok[:, None], other=0.0)  # [TILE, R], k_pe's own bits
        else:
            kv = tl.load(row[:, None] + c[None, :], mask=k_ok[:, None], other=0.0)  # [TILE, L]
            kpe = tl.load(row[:, None] + LORA + r[None, :], mask=k_ok[:, None], other=0.0)  # [TILE, R]
        if KV_FP8:
            kv = (kv.to(tl.float32) * kv_scale).to(q_lat.dtype)
            kpe = (kpe.to(tl.float32) * kv_scale).to(q_lat.dtype)
        s = tl.dot(q_lat, tl.trans(kv), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe, tl.trans(kpe), input_precision=DOT_PRECISION)
        s = tl.where(k_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a head that has seen nothing yet
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m - shift)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=DOT_PRECISION)
        m = m_new

    part = (token.to(tl.int64) * num_heads + heads) * NUM_SEGMENTS + segment
    tl.store(acc_ptr + part[:, None] * LORA + c[None, :], acc, mask=h_ok[:, None])
    tl.store(stats_ptr + part * 2, m, mask=h_ok)
    tl.store(stats_ptr + part * 2 + 1, l, mask=h_ok)


def num_segments(max_seq_len: int) -> int:
    """A power of two: about SEGMENT_KEYS keys per segment, at most MAX_SEGMENTS."""
    return min(MAX_SEGMENTS, triton.next_power_of_2(triton.cdiv(max_seq_len, SEGMENT_KEYS)))


def mla_decode(q, latent_cache, block_table, seq_lens, query_start_loc, out, *, scale, kv_scale=1.0,
               scale_tile=None, slots=None):
    """Absorbed MLA of packed queries q [T, H, L + R] over the paged latent cache
    [num_blocks, block_size, L + R] (q's dtype or fp8 e4m3 codes standing for code * kv_scale) into
    out [T, H, L]; returns the LSE [T, H] (natural log). Causal, bottom-right. With `scale_tile`,
    the cache is a split one of bytes [num_blocks, block_size, entry] (spec.SplitLatent): L fp8
    codes, an fp32 scale per `scale_tile` of them, k_pe in q's dtype. With `slots` [T, topk] (int64
    cache slots, -1 for none), sparse: each query attends exactly its listed tokens."""
    T, H, width = q.shape
    lora = out.shape[2]
    rope = width - lora
    entry = lora + 4 * (lora // scale_tile) + rope * q.element_size() if scale_tile else width
    for ok, field, value, rule in (
        (latent_cache.shape[2] == entry, "latent_cache.shape[2]", latent_cache.shape[2],
         f"must be {entry} (q's width, or a split entry's bytes)"),
        (latent_cache.dtype == torch.uint8 if scale_tile else latent_cache.dtype in (q.dtype, torch.float8_e4m3fn),
         "latent_cache.dtype", latent_cache.dtype, f"must be uint8 (split) or q's dtype ({q.dtype}) or float8_e4m3fn"),
        (not scale_tile or lora % scale_tile == 0, "scale_tile", scale_tile, f"must divide L ({lora})"),
        (all(d >= 16 and d & (d - 1) == 0 for d in (lora, rope)), "(L, R)", (lora, rope),
         "must be powers of two >= 16"),
        (q.stride(2) == latent_cache.stride(2) == 1, "q/latent_cache.stride(2)", (q.stride(2), latent_cache.stride(2)),
         "must be 1 (contiguous last dim)"),
    ):
        if not ok:
            raise ValueError(f"mla_decode: {field} = {value}: {rule}")
    if slots is not None and not (slots.shape == (T, slots.shape[1]) and slots.dtype == torch.int64
                                  and slots.is_contiguous()):
        raise ValueError(f"mla_decode: slots = {tuple(slots.shape)} {slots.dtype}: must be contiguous int64 [T, topk]")
    segments = num_segments(int(seq_lens.max()) if slots is None else slots.shape[1])
    block_h = 16  # tl.dot's least M
    # fp32 at "ieee" precision runs on CUDA cores: 32-key tiles spilled 11 KB a thread on sm_90
    # (kept by the driver as local memory for every thread of the GPU); 16 spill nothing. The
    # interpreter (CPU tensors) has no registers and pays per tile step: 32 there.
    tile = 16 if q.is_cuda and q.dtype == torch.float32 else 32
    acc = torch.empty(T, H, segments, lora, dtype=torch.float32, device=q.device)
    stats = torch.empty(T, H, segments, 2, dtype=torch.float32, device=q.device)
    _mla_decode_kernel[(T, triton.cdiv(H, block_h), segments)](
        acc, stats, q, latent_cache, block_table, seq_lens, query_start_loc, q if slots is None else slots,
        seq_lens.numel(), H, latent_cache.shape[1], scale, kv_scale, 0 if slots is None else slots.shape[1],
        q.stride(0), q.stride(1), latent_cache.stride(0), latent_cache.stride(1), block_table.stride(0),
        LORA=lora, ROPE=rope, BLOCK_H=block_h, TILE=tile, KV_FP8=latent_cache.dtype == torch.float8_e4m3fn,
        SCALE_TILE=scale_tile or 0, SPARSE=slots is not None,
        NUM_SEGMENTS=segments, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    _reduce_segments_kernel[(T, H)](
        out, lse, acc, stats, q, H, out.stride(0), out.stride(1),  # q: the sinks pointer, never read
        HEAD_DIM=lora, HEAD_DIM_PAD=lora, NUM_SEGMENTS=segments, USE_SINKS=False,
    )
    return lse
