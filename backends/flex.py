"""torch FlexAttention reading the paged cache in place.

The whole physical cache is one key sequence of num_blocks * block_size slots and the packed
queries one query sequence; a mask_mod built from the block tables lets each query see exactly the
slots in its own sequence's blocks (document masking over physical slots; a shared prompt block is
in several sequences' tables), so no page is gathered. The
block mask's sparsity skips every key tile a query tile cannot see.

Every feature is a tensor the mask_mod / score_mod read (not a Python branch), and shapes are
padded to power-of-two buckets (of at least 512 queries and 32k slots), so one compiled kernel
serves many cases: torch.compile of flex_attention costs seconds per new graph.
"""
from __future__ import annotations

import functools
import sys
import warnings

import torch

from conformance import Backend, Capabilities, Case, Unsupported, register_backend
from conformance.registry import ALL_KV_LAYOUTS, DEFAULT_FEATURES


def _bucket(n: int, least: int) -> int:
    return max(least, 1 << (n - 1).bit_length())


@functools.cache
def _compiled_flex(dynamic: bool):
    from torch.nn.attention.flex_attention import flex_attention
    # The first call compiles (a long silence: the main job sat at its first case for 20-45 s on a CPU).
    print("flex: compiling FlexAttention with torch.compile (its first use takes ~15-45 s on a CPU, less with a warm "
          "inductor cache) ...", file=sys.stderr, flush=True)
    return torch.compile(flex_attention, dynamic=dynamic)


@register_backend
class FlexBackend(Backend):
    name = "flex"
    description = "torch FlexAttention (compiled) over the physical paged cache with a block-table mask_mod"
    # Compiled flex on CPU has no LSE; on CUDA it is returned.
    # cache_copies: K and V padded to a power of two of slots, up to twice the cache (measured: 1.5)
    capabilities = Capabilities(returns_lse=False, kv_layouts=ALL_KV_LAYOUTS,
                                features=DEFAULT_FEATURES | {"empty_sequences"}, cache_copies=2)
    # Masked-out slots of a visible key tile still enter P @ V with P = 0, and 0 * NaN = NaN.
    finite_poison = True

    def unavailable(self):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:
            return f"torch.nn.attention.flex_attention not importable: {e}"
        return None

    def run(self, case: Case):
        spec, dev = case.spec, case.device
        nb, bs, hkv, d = case.k_cache.shape
        t, s = case.q.shape[0], nb * bs
        # At least 512 queries and 32k slots: on CPU, where flex compiles static shapes (seconds
        # each), every CPU-sized case of one dtype and head layout then shares one graph; the
        # block mask skips the padding, so it costs next to nothing.
        t_pad, s_pad = _bucket(t, 512), _bucket(s, 1 << 15)

        # Each sequence's logical block index of every physical block (-1: not in its table). A block
        # may be in several tables (a shared prompt), at the same logical index in each.
        # Padded to buckets too (padding sequences own nothing), so CPU graphs stay shared.
        bt = case.block_table.to(torch.int64)
        n_seqs = bt.shape[0]
        seq_lens = torch.zeros(_bucket(n_seqs, 64), dtype=torch.int64, device=dev)
        seq_lens[:n_seqs] = case.seq_lens
        owned = torch.arange(bt.shape[1], device=dev)[None, :] < ((seq_lens[:n_seqs] + bs - 1) // bs)[:, None]
        # A column for every block a slot index can name (padding slots too); on CPU as many as slots,
        # so the shape does not depend on the block size (a compile per shape costs seconds there).
        width = s_pad if dev.type == "cpu" else -(-s_pad // bs)
        block_col = torch.full((seq_lens.numel(), width), -1, dtype=torch.int32, device=dev)
        rows, cols = torch.nonzero(owned, as_tuple=True)
        block_col[rows, bt[rows, cols]] = cols.to(torch.int32)
        bs_t = torch.tensor(bs, device=dev)  # a tensor, not a constant of the graph

        # Each query's sequence and absolute position (context + i); padding rows own nothing.
        qsl = case.query_start_loc.to(torch.int64)
        q_lens = qsl[1:] - qsl[:-1]
        q_seq = torch.full((t_pad,), -1, dtype=torch.int64, device=dev)
        q_pos = torch.zeros(t_pad, dtype=torch.int64, device=dev)
        q_seq[:t] = torch.repeat_interleave(torch.arange(q_lens.numel(), device=dev), q_lens)
        q_pos[:t] = torch.arange(t, device=dev) - qsl[q_seq[:t]] + case.context_lens.to(torch.int64)[q_seq[:t]]

        causal = torch.tensor(spec.causal, device=dev)
        window = torch.tensor(spec.sliding_window or (1 << 40), device=dev)
        cap = torch.tensor(spec.softcap or 0.0, device=dev, dtype=torch.float32)

        def mask_mod(b, h, qi, ki):
            seq = q_seq[qi].clamp(min=0)
            col = block_col[seq, ki // bs_t].to(torch.int64)  # padding slots lie in blocks no sequence owns
            pos = col * bs_t + ki % bs_t  # the slot's position in the query's sequence, if it is there
            dist = q_pos[qi] - pos
            mine = (q_seq[qi] >= 0) & (col >= 0) & (pos < seq_lens[seq])
            return mine & ((dist >= 0) | ~causal) & (dist < window)

        def score_mod(score, b, h, qi, ki):
            return torch.where(cap > 0, cap * torch.tanh(score / cap), score)

        block_mask = _paged_block_mask(q_seq, rows, bt[rows, cols], bs, n_seqs, t_pad, s_pad, mask_mod)
        q = torch.zeros(1, spec.heads.num_q_heads, t_pad, d, dtype=case.q.dtype, device=dev)
        q[0, :, :t] = case.q.transpose(0, 1)
        k = _pad_slots(case.k_cache.reshape(s, hkv, d), s_pad)  # a copy for the strided layouts
        v = _pad_slots(case.v_cache.reshape(s, hkv, d), s_pad)
        want_lse = dev.type == "cuda"
        # Each dtype x head layout x bucket is a graph: more than dynamo's default 8 per function.
        # Past its limit dynamo silently runs flex eagerly (the unfused math path); that must be an
        # ERROR, not a PASS of something else, so the fallback warning is raised.
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=512, accumulated_recompile_limit=4096), \
                warnings.catch_warnings():
            warnings.filterwarnings("error", message="flex_attention called without torch.compile")
            # Dynamic shapes on CUDA (one kernel per dtype and head layout); static on CPU, where
            # inductor's dynamic-shape flex template fails to build for fp16.
            flex = _compiled_flex(dev.type == "cuda")
            try:
                res = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=case.scale, enable_gqa=True,
                           return_lse=want_lse)
            except Exception as e:  # inductor finds no kernel config for the shape (fp32 d192 on sm_90)
                if "No valid triton configs" in str(e) and "out of resource" in str(e):
                    raise Unsupported(f"inductor has no flex kernel config for this shape: {str(e).splitlines()[0]}")
                raise
        out, lse = res if want_lse else (res, None)
        case.out.copy_(out[0, :, :t].transpose(0, 1))
        return case.out, (lse[0, :, :t].transpose(0, 1) if lse is not None else None)


def _paged_block_mask(q_seq: torch.Tensor, seqs: torch.Tensor, blocks: torch.Tensor, bs: int, num_seqs: int,
                      t_pad: int, s_pad: int, mask_mod):
    """The block mask straight from the block tables: a query tile visits exactly the key tiles
    holding blocks (seqs[i] owns blocks[i]) of the sequences its rows belong to; within a tile,
    mask_mod decides. (create_block_mask finds the same tiles by evaluating mask_mod on every query
    x slot pair: 0.2 s a call on a CPU at these sizes.)"""
    from torch.nn.attention.flex_attention import BlockMask

    tile = 128  # flex's default block size, both ways
    dev = q_seq.device
    rows = torch.nonzero(q_seq >= 0).flatten()
    query_owners = torch.zeros(t_pad // tile, num_seqs, device=dev)  # [query tiles, sequences]
    query_owners[rows // tile, q_seq[rows]] = 1.0
    key_owners = torch.zeros(s_pad // tile, num_seqs, device=dev)  # [key tiles, sequences]
    first, last = blocks * bs // tile, (blocks * bs + bs - 1) // tile
    for step in range((bs + tile - 1) // tile + 1):  # every tile a block touches
        key_owners[torch.minimum(first + step, last), seqs] = 1.0
    visits = (query_owners @ key_owners.T) > 0  # [query tiles, key tiles]
    kv_num_blocks = visits.sum(-1, dtype=torch.int32)
    kv_indices = torch.argsort(visits.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(kv_num_blocks[None, None], kv_indices[None, None], BLOCK_SIZE=tile,
                                    mask_mod=mask_mod, seq_lengths=(t_pad, s_pad))


def _pad_slots(cache: torch.Tensor, s_pad: int) -> torch.Tensor:
    """[S, Hkv, D] -> [1, Hkv, s_pad, D]; pad slots are zeros and masked out anyway."""
    out = cache.new_zeros(1, cache.shape[1], s_pad, cache.shape[2])
    out[0, :, : cache.shape[0]] = cache.transpose(0, 1)
    return out
