"""`flashmla`: DeepSeek's FlashMLA (`flash_mla`) as the decode path of an MLA backend, as vLLM's
FlashMLA backend uses it: absorbed queries [B, s_q, H, L + R] with one query length per batch
(uniform decode; other sequences take the expanded prefill path of backends/mla.py), the latent
cache as [num_blocks, 64, 1, L + R], bottom-right causal. FlashMLA gives +inf as the LSE of a row
with no keys; the suite's convention is -inf.

Written from the library's contract (flash_mla_interface.py; vLLM's flashmla backend), not run
here: its wheel cannot be built on the machines of this project, so every case skips naming the
missing module. get_mla_metadata is called the way all its versions accept (the newest ignores
the arguments and schedules on the first call).

`flashmla-sparse`: FlashMLA's sparse prefill kernel `flash_mla_sparse_fwd` for sparse cases
(CaseSpec.topk), every query through it as vLLM's FlashMLASparse backend does with a bf16 cache:
absorbed queries [T, H, 576] (heads padded with zeros to a multiple of 64, the kernel's head
tile), the paged cache viewed flat as [slots, 1, 576], each query's index list as the cache slots
it names [T, 1, topk] (-1 for none); its LSE is base 2.
"""
from __future__ import annotations

import math

import torch

from conformance import Capabilities, register_backend

from .mla import DECODE_THRESHOLD, MLACommon


class FlashMLA(MLACommon):
    name = "flashmla"
    description = f"FlashMLA flash_mla_with_kvcache, uniform decode path (up to {DECODE_THRESHOLD} new tokens)"
    uniform_decode = True
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), compute_capability=((9, 0), (9, 0)), features=frozenset({"causal"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}), block_sizes=frozenset({64}),
        latent_dims=frozenset({(512, 64)}),  # the only shape FlashMLA is built for
        cache_copies=0,
        returns_lse=True, requires=("flash_mla",),
    )

    def latent_attention(self, case, part, q_abs):
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata

        h = case.spec.heads
        b, s_q = part.seqs.numel(), part.max_query_len
        q = q_abs.view(b, s_q, h.num_q_heads, h.latent_dim)
        metadata, num_splits = get_mla_metadata(part.seq_lens, s_q * h.num_q_heads, 1)
        o_lat, lse = flash_mla_with_kvcache(q, case.latent_cache.unsqueeze(-2), part.block_table, part.seq_lens,
                                            h.kv_lora_rank, metadata, num_splits, softmax_scale=case.scale,
                                            causal=True)
        lse = lse.transpose(1, 2).reshape(b * s_q, h.num_q_heads)  # [b, H, s_q] -> packed [T, H]
        lse = lse.masked_fill(lse.isposinf(), float("-inf"))
        return o_lat.reshape(b * s_q, h.num_q_heads, -1), lse


class FlashMLASparse(MLACommon):
    name = "flashmla-sparse"
    description = "FlashMLA flash_mla_sparse_fwd over each query's listed cache slots (sparse cases only)"
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), compute_capability=((9, 0), (10, 0)), features=frozenset({"causal", "sparse"}),
        dtypes=frozenset({torch.bfloat16}), latent_dims=frozenset({(512, 64)}), returns_lse=True, cache_copies=0,
        requires=("flash_mla",),
    )
    head_tile = 64  # the kernel takes 64 or 128 query heads

    def unsupported(self, spec, device):
        if spec.topk is None:
            return "sparse cases only (CaseSpec.topk); FlashMLA's dense decode is the flashmla backend"
        return None

    def sparse_attention(self, case, q_abs, slots):
        from flash_mla import flash_mla_sparse_fwd

        T, H, width = q_abs.shape
        padded = -(-H // self.head_tile) * self.head_tile
        q = torch.zeros(T, padded, width, dtype=q_abs.dtype, device=q_abs.device)
        q[:, :H] = q_abs
        out, _, lse = flash_mla_sparse_fwd(q, case.latent_cache.view(-1, 1, width), slots.int()[:, None, :],
                                           case.scale, d_v=case.spec.heads.kv_lora_rank)
        return out[:, :H], lse[:, :H] * math.log(2)  # base 2 -> natural


register_backend(FlashMLA)
register_backend(FlashMLASparse)
