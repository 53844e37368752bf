"""FlashInfer's paged wrappers: `flashinfer-decode` (BatchDecodeWithPagedKVCacheWrapper, decode
batches) and `flashinfer-prefill` (BatchPrefillWithPagedKVCacheWrapper, any batch).

FlashInfer takes pages as CSR (indptr, indices, last_page_len), a window as window_left = keys to
the left of the query (window - 1), returns LSE in base 2, folds k_scale into the softmax scale
and applies v_scale to the output. Its `sinks=` argument is dropped by the fa2/fa3 kernels of
these wrappers (read from flashinfer 0.7.2's source), so sinks are not claimed.
"""
from __future__ import annotations

import functools
import math

import torch

from conformance import Backend, Capabilities, Case, register_backend

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace


@functools.cache
def _workspace(device: torch.device) -> torch.Tensor:
    return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def _pages(case: Case):
    """CSR page lists of the block table: indptr [B + 1], indices [sum blocks], last_page_len [B]."""
    bs = case.k_cache.shape[1]
    n_blocks = (case.seq_lens + bs - 1) // bs
    indptr = torch.zeros(n_blocks.numel() + 1, dtype=torch.int32, device=case.device)
    indptr[1:] = torch.cumsum(n_blocks, 0)
    owned = torch.arange(case.block_table.shape[1], device=case.device)[None, :] < n_blocks[:, None]
    indices = case.block_table[owned].to(torch.int32)
    last_page_len = (case.seq_lens - (n_blocks - 1) * bs).to(torch.int32)
    return indptr, indices, last_page_len


class FlashInferBackend(Backend):
    capabilities = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        kv_dtypes=frozenset({"auto", "fp8_e4m3"}),
        head_dims=frozenset({64, 128, 256}),  # its split-KV merge dispatches only these
        returns_lse=True,
        requires=("flashinfer",),
    )

    def __init__(self, name: str, decode: bool):
        self.name, self.decode = name, decode
        self.description = ("FlashInfer BatchDecodeWithPagedKVCacheWrapper (tensor cores)" if decode
                            else "FlashInfer BatchPrefillWithPagedKVCacheWrapper")

    def unsupported(self, spec, device):
        if self.decode and not spec.batch.is_decode:
            return "decode wrapper: batches with prefill tokens go to flashinfer-prefill"
        return None

    def prepare(self, case: Case):
        import flashinfer

        spec = case.spec
        hq, hkv, d = spec.heads.num_q_heads, spec.heads.num_kv_heads, spec.heads.head_dim
        indptr, indices, last_page_len = _pages(case)
        common = dict(
            window_left=spec.sliding_window - 1 if spec.sliding_window else -1,
            logits_soft_cap=spec.softcap or 0.0, sm_scale=case.scale,
            q_data_type=spec.dtype, kv_data_type=case.k_cache.dtype,
        )
        ws = _workspace(case.device)
        if self.decode:
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
            wrapper.plan(indptr, indices, last_page_len, hq, hkv, d, case.k_cache.shape[1], **common)
        else:
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
            wrapper.plan(case.query_start_loc, indptr, indices, last_page_len, hq, hkv, d, case.k_cache.shape[1],
                         causal=spec.causal, **common)
        scales = {}
        if spec.kv_dtype != "auto":
            scales = dict(k_scale=case.k_scale, v_scale=case.v_scale)

        def call():
            out, lse = wrapper.run(case.q, (case.k_cache, case.v_cache), out=case.out, return_lse=True, **scales)
            return out, lse * math.log(2)  # base 2 -> natural log

        return call


register_backend(FlashInferBackend("flashinfer-decode", decode=True))
register_backend(FlashInferBackend("flashinfer-prefill", decode=False))
