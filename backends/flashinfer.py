"""FlashInfer's paged wrappers, one adapter per wrapper x kernel backend:

- `flashinfer-prefill-fa2`, `flashinfer-prefill-fa3`: BatchPrefillWithPagedKVCacheWrapper, any batch;
- `flashinfer-decode`: BatchDecodeWithPagedKVCacheWrapper on CUDA cores (its own decode kernels);
- `flashinfer-decode-fa2`, `flashinfer-decode-fa3`: the decode wrapper on tensor cores (the prefill
  kernels of that backend; fa2 also takes a uniform number of new tokens per sequence, as in
  speculative decoding);
- `flashinfer-mla`: BatchMLAPagedAttentionWrapper as the decode path of an MLA backend (vLLM's
  split; prefill expanded in torch, as backends/mla.py says); `flashinfer-mla-absorbed`: every
  sequence through the wrapper, prefill included (its causal mask is bottom-right);
  `flashinfer-mla-sparse`: the same wrapper over sparse MLA's index lists (page size 1).

FlashInfer takes pages as CSR (indptr, indices, last_page_len), the cache in any of the suite's
layouts ("NHD"/"HND", as a (k, v) pair or one [pages, 2, ...] tensor), a window as window_left =
keys to the left of the query (window - 1); it folds k_scale into the softmax scale and applies
v_scale to the output, and returns LSE in base 2 (converted here). New tokens are written by
FlashInfer's own append_paged_kv_cache; for an fp8 cache they are quantized first by the suite's
rule (FlashInfer's append copies elements of the cache's dtype and quantizes nothing).
Sinks are not claimed: these wrappers drop `sinks=` in the fa2/fa3 kernels (flashinfer 0.7.2);
FlashInfer serves them through a separate wrapper, not adapted here.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from conformance import Backend, Capabilities, Case, register_backend
from conformance.paged import quantize
from conformance.registry import ALL_KV_LAYOUTS, DEFAULT_FEATURES

from .mla import DECODE_THRESHOLD, MLACommon

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace
HEAD_DIMS = frozenset({64, 128, 256})  # what its prefill and decode kernels instantiate
SM90 = ((9, 0), (9, 0))  # fa3 is Hopper-only


@functools.cache
def _workspace(device: torch.device) -> torch.Tensor:
    return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def _pages(case: Case):
    """CSR page lists of the block table: indptr [B + 1], indices [sum blocks], last_page_len [B]."""
    return _csr_pages(case.block_table, case.seq_lens, case.k_cache.shape[1])


def _csr_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, bs: int):
    n_blocks = (seq_lens + bs - 1) // bs
    indptr = torch.zeros(n_blocks.numel() + 1, dtype=torch.int32, device=block_table.device)
    indptr[1:] = torch.cumsum(n_blocks, 0)
    owned = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < n_blocks[:, None]
    indices = block_table[owned].to(torch.int32)
    last_page_len = (seq_lens - (n_blocks - 1) * bs).to(torch.int32)
    return indptr, indices, last_page_len


def _layout(case: Case) -> str:
    return "HND" if case.spec.kv_layout.endswith("hnd") else "NHD"


class FlashInferBackend(Backend):
    def __init__(self, name: str, wrapper: str, kernels: str | None):
        """wrapper: "prefill", "decode" (CUDA cores) or "decode_tc" (tensor cores); kernels: the
        wrapper's `backend=` ("fa2" / "fa3"), None for the CUDA-core decode kernels."""
        self.name, self.wrapper, self.kernels = name, wrapper, kernels
        self.description = {
            "prefill": f"FlashInfer BatchPrefillWithPagedKVCacheWrapper, backend={kernels}",
            "decode": "FlashInfer BatchDecodeWithPagedKVCacheWrapper, CUDA-core decode kernels",
            "decode_tc": f"FlashInfer BatchDecodeWithPagedKVCacheWrapper on tensor cores, backend={kernels}",
        }[wrapper]
        self.capabilities = Capabilities(
            devices=frozenset({"cuda"}),
            compute_capability=SM90 if kernels == "fa3" else None,
            dtypes=frozenset({torch.float16, torch.bfloat16}),
            kv_dtypes=frozenset({"auto", "fp8_e4m3"}),
            kv_layouts=ALL_KV_LAYOUTS,
            head_dims=HEAD_DIMS,
            features=DEFAULT_FEATURES | {"empty_sequences"},
            # The CUDA-core decode kernels dispatch these GQA group sizes only ("Unsupported group_size: 7").
            gqa_ratios=frozenset({1, 2, 3, 4, 6, 8, 16}) if wrapper == "decode" else None,
            returns_lse=True,
            cuda_graphs=wrapper != "prefill",  # the decode wrapper's use_cuda_graph mode (prepare_graph)
            requires=("flashinfer",),
            cache_copies=0,  # the pages read in place
        )

    def unsupported(self, spec, device):
        if self.kernels == "fa3" and spec.kv_dtype != "auto":
            return "fa3 takes an fp8 KV cache only with fp8 queries (flashinfer.utils.is_fa3_backend_supported)"
        if self.wrapper == "decode" and not spec.batch.is_decode:
            return "CUDA-core decode: one new token per sequence (other batches go to flashinfer-prefill-*)"
        if self.wrapper == "decode_tc":
            q_lens = set(spec.batch.query_lens) - {0}  # empty sequences are left out of the plan
            if self.kernels == "fa3" and q_lens != {1}:
                return "fa3 tensor-core decode: one new token per sequence (q_len_per_req > 1 is fa2-only)"
            if len(q_lens) != 1:
                return "decode wrapper: the same number of new tokens in every sequence (q_len_per_req)"
            if not spec.causal:
                return "decode wrapper: causal only (its mask is derived from q_len_per_req)"
        return None

    def graph_unsupported(self, spec, device):
        if self.wrapper == "decode_tc" and max(spec.batch.query_lens) > 1:
            return ("graph replay with q_len_per_req > 1: a padding request (no pages) breaks the plan's rule "
                    "kv_len >= q_len_per_req")
        return None

    def compile_key(self, spec):
        # FlashInfer JIT-compiles one module per wrapper path x these; tensor-core decode runs the
        # prefill modules of its backend.
        module = "decode" if self.wrapper == "decode" else f"prefill-{self.kernels}"
        return (module, spec.dtype, spec.cache_dtype, spec.heads.head_dim, spec.sliding_window is not None,
                spec.softcap is not None)

    def write_cache(self, case: Case) -> None:
        import flashinfer

        indptr, indices, last_page_len = _pages(case)
        batch_indices, positions = flashinfer.get_batch_indices_positions(
            case.query_start_loc, case.seq_lens, case.q.shape[0])
        k, v = (quantize(x, scale, case.k_cache.dtype) for x, scale in
                ((case.k_new, case.k_scale), (case.v_new, case.v_scale)))
        flashinfer.append_paged_kv_cache(k, v, batch_indices, positions, case.stored_cache(), indices, indptr,
                                         last_page_len, kv_layout=_layout(case))

    @staticmethod
    def _plan_args(case: Case) -> tuple[tuple, dict]:
        """What plan() takes after the page lists, positional (the head dim's name differs between
        the wrappers) and by name."""
        spec, h = case.spec, case.spec.heads
        return (h.num_q_heads, h.num_kv_heads, h.head_dim, case.k_cache.shape[1]), dict(
            window_left=spec.sliding_window - 1 if spec.sliding_window else -1, logits_soft_cap=spec.softcap or 0.0,
            sm_scale=case.scale, q_data_type=spec.dtype, kv_data_type=case.k_cache.dtype)

    def prepare(self, case: Case):
        import flashinfer

        ws = _workspace(case.device)
        shape, args = self._plan_args(case)
        if self.wrapper == "prefill":
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, _layout(case), backend=self.kernels)
            wrapper.plan(case.query_start_loc, *_pages(case), *shape, causal=case.spec.causal, **args)
        else:
            # One query row per request: an empty sequence (no rows) is no request here.
            live = case.seq_lens > 0
            pages = _csr_pages(case.block_table[live], case.seq_lens[live], case.k_cache.shape[1])
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                ws, _layout(case), use_tensor_cores=self.wrapper == "decode_tc", backend=self.kernels or "auto")
            wrapper.plan(*pages, *shape, q_len_per_req=case.max_query_len, **args)
        return self._call(wrapper, case)

    def prepare_graph(self, case: Case):
        """The decode wrapper in CUDA-graph mode: its page lists in buffers of the captured batch size
        that every plan() rewrites. A padding slot (an empty sequence) is a request of no pages whose
        query row is a padding row."""
        import flashinfer

        i32 = dict(dtype=torch.int32, device=case.device)
        batch = case.seq_lens.numel()
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            _workspace(case.device), _layout(case), use_cuda_graph=True, use_tensor_cores=self.wrapper == "decode_tc",
            paged_kv_indptr_buffer=torch.empty(batch + 1, **i32),
            paged_kv_indices_buffer=torch.empty(case.block_table.numel(), **i32),
            paged_kv_last_page_len_buffer=torch.empty(batch, **i32), backend=self.kernels or "auto")
        shape, args = self._plan_args(case)
        return self._call(wrapper, case), lambda: wrapper.plan(*_pages(case), *shape, q_len_per_req=case.max_query_len,
                                                               **args)

    @staticmethod
    def _call(wrapper, case: Case):
        scales = dict(k_scale=case.k_scale, v_scale=case.v_scale) if case.spec.kv_dtype != "auto" else {}
        kv = case.stored_cache()

        def call():
            out, lse = wrapper.run(case.q, kv, out=case.out, return_lse=True, **scales)
            return out, lse * math.log(2)  # base 2 -> natural log

        return call


class FlashInferMLA(MLACommon):
    """The MLA wrapper takes absorbed queries [T, H, L + R] and the latent cache as it lies (CSR page
    lists); "auto" picks fa3 on sm_90, fa2 before. Its fp8 path multiplies the codes by the scale
    cast to bf16 (the suite's MLA scales are bf16 values) and needs bf16 queries."""

    capabilities = Capabilities(
        devices=frozenset({"cuda"}), compute_capability=((8, 0), (9, 0)), features=frozenset({"causal"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}), kv_dtypes=frozenset({"auto", "fp8_e4m3"}),
        returns_lse=True, requires=("flashinfer",), cache_copies=0,
    )

    def __init__(self, name: str, absorbed_prefill: bool):
        self.name = name
        if absorbed_prefill:
            self.decode_threshold = math.inf
        self.description = ("FlashInfer BatchMLAPagedAttentionWrapper, " +
                            ("every sequence (prefill too)" if absorbed_prefill else
                             f"decode path (up to {DECODE_THRESHOLD} new tokens); prefill expanded in torch"))

    def unsupported(self, spec, device):
        if spec.kv_dtype != "auto" and spec.dtype != torch.bfloat16:
            return "fp8 latents only with bf16 queries (flashinfer.mla fa2/fa3 plan check)"
        return None

    def compile_key(self, spec):
        return ("mla", spec.dtype, spec.cache_dtype)  # one module per q / kv dtype (page size, causal: run time)

    def latent_attention(self, case, part, q_abs):
        indptr, indices, _ = _csr_pages(part.block_table, part.seq_lens, case.latent_cache.shape[1])
        return self._attend(case, q_abs, (part.query_start_loc, indptr, indices, part.seq_lens), case.latent_cache,
                            causal=True)

    def _attend(self, case, q_abs, csr, kv_cache, causal):
        """The wrapper over CSR page lists csr = (qo_indptr, kv_indptr, kv_indices, kv_len)."""
        from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata

        h = case.spec.heads
        wrapper = BatchMLAPagedAttentionWrapper(_workspace(case.device), backend="auto")
        wrapper.plan(metadata=MLAPlanMetadata.csr(*csr), num_heads=h.num_q_heads, head_dim_ckv=h.kv_lora_rank,
                     head_dim_kpe=h.qk_rope_head_dim, page_size=kv_cache.shape[1], causal=causal,
                     sm_scale=case.scale, q_data_type=case.spec.dtype, kv_data_type=kv_cache.dtype, lse_mode="basee")
        scales = dict(ckv_scale=case.kv_scale, kpe_scale=case.kv_scale) if case.spec.kv_dtype != "auto" else {}
        return wrapper.run(query=q_abs, kv_cache=kv_cache, return_lse=True, return_lse_base_on_e=True, **scales)


class FlashInferMLASparse(FlashInferMLA):
    """Sparse MLA as vLLM's sm_90 FlashInfer backend runs it: page size 1, so each query's listed
    slots are its page list; each query is a request of its own with its -1 entries dropped (the
    kernel reads kv_len entries and knows no padding); not causal (the list says what it sees)."""

    capabilities = dataclasses.replace(FlashInferMLA.capabilities, features=frozenset({"causal", "sparse"}))

    def __init__(self):
        super().__init__("flashinfer-mla-sparse", absorbed_prefill=False)
        self.description = "FlashInfer BatchMLAPagedAttentionWrapper over each query's listed cache slots (sparse only)"

    def unsupported(self, spec, device):
        if spec.topk is None:
            return "sparse cases only (CaseSpec.topk); dense MLA is flashinfer-mla"
        return super().unsupported(spec, device)

    def sparse_attention(self, case, q_abs, slots):
        listed = slots >= 0
        kv_len = listed.sum(1, dtype=torch.int32)
        kv_indptr = torch.nn.functional.pad(torch.cumsum(kv_len, 0, dtype=torch.int32), (1, 0))
        qo_indptr = torch.arange(len(slots) + 1, dtype=torch.int32, device=slots.device)
        slot_cache = case.latent_cache.view(-1, 1, case.latent_cache.shape[-1])
        return self._attend(case, q_abs, (qo_indptr, kv_indptr, slots[listed].int(), kv_len), slot_cache,
                            causal=False)


register_backend(FlashInferMLA("flashinfer-mla", absorbed_prefill=False))
register_backend(FlashInferMLA("flashinfer-mla-absorbed", absorbed_prefill=True))
register_backend(FlashInferMLASparse())
register_backend(FlashInferBackend("flashinfer-prefill-fa2", "prefill", "fa2"))
register_backend(FlashInferBackend("flashinfer-prefill-fa3", "prefill", "fa3"))
register_backend(FlashInferBackend("flashinfer-decode", "decode", None))
register_backend(FlashInferBackend("flashinfer-decode-fa2", "decode_tc", "fa2"))
register_backend(FlashInferBackend("flashinfer-decode-fa3", "decode_tc", "fa3"))
