"""FlashAttention varlen over the paged cache, one adapter per implementation:

- `flash-attn2`: the flash_attn package (FA2), flash_attn_varlen_func with block_table; its paged
  kernels take pages of a multiple of 256 tokens;
- `flash-attn3`: flash_attn_interface (FA3, Hopper), flash_attn_with_kvcache with cu_seqlens_q and a
  page table (its varlen function takes no page table), any page size;
- `flash-attn4`: flash_attn.cute (FA4), flash_attn_varlen_func with page_table and seqused_k;
  attention sinks (learnable_sink);
- `vllm-fa2`, `vllm-fa3`: vLLM's own FlashAttention build (vllm.vllm_flash_attn, shipped in vLLM's
  wheel), flash_attn_varlen_func with block_table and seqused_k and fa_version 2 or 3: the paged
  path vLLM serves with (pages of a multiple of 16; FA3 takes sinks as s_aux);
- `flash-torch`: torch's own FlashAttention, torch.nn.attention.varlen.varlen_attn; it reads pages
  through block_table + seqused_k where this torch has them, else the pages are gathered into the
  ragged layout first (the description says which).

All share FlashAttention's conventions: bottom-right causal masks, window_size = (left, right) keys
around the query (a window of w keys is (w - 1, 0)), softcap after the scale, GQA by head groups,
LSE in natural log as [Hq, T] (transposed here). Each skips with the reason when not importable.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys

import torch

from conformance import Backend, Capabilities, Case, KnownFailure, gather_kv, register_backend
from conformance.registry import ALL_KV_LAYOUTS, DEFAULT_FEATURES

HALF = frozenset({torch.float16, torch.bfloat16})
FA_HEAD_DIMS = frozenset(range(8, 257, 8))  # head_dim <= 256, a multiple of 8


def _window(case: Case):
    return (case.spec.sliding_window - 1, 0) if case.spec.sliding_window else (-1, -1)


def _lse_tokens_first(lse: torch.Tensor, case: Case) -> torch.Tensor:
    """FlashAttention's varlen LSE is [Hq, T]; the suite's is [T, Hq]."""
    return lse.transpose(0, 1) if tuple(lse.shape) == (case.q.shape[1], case.q.shape[0]) else lse


class FlashAttentionBackend(Backend):
    def __init__(self, name: str, module: str, description: str, caps: dict, finite_poison: bool = False):
        self.name, self.module, self.description = name, module, description
        self.finite_poison = finite_poison
        self.capabilities = Capabilities(**{
            "devices": frozenset({"cuda"}), "dtypes": HALF, "head_dims": FA_HEAD_DIMS, "returns_lse": True,
            "cache_copies": 0, **caps})  # the pages read in place (flash-torch's gather is of the tokens)

    def unavailable(self):
        try:
            importlib.import_module(self.module)
        except Exception as e:  # noqa: BLE001 - a missing or broken build: skipped with its reason
            return f"{self.module} is not importable ({type(e).__name__}: {e})"
        return None

    def lib(self):
        return importlib.import_module(self.module)


class FlashAttn2(FlashAttentionBackend):
    def run(self, case: Case):
        cu_seqlens_k = torch.zeros_like(case.query_start_loc)
        cu_seqlens_k[1:] = torch.cumsum(case.seq_lens, 0)
        out, lse, _ = self.lib().flash_attn_varlen_func(
            case.q, case.k_cache, case.v_cache, case.query_start_loc, cu_seqlens_k, case.max_query_len,
            case.max_seq_len, softmax_scale=case.scale, causal=case.spec.causal, window_size=_window(case),
            softcap=case.spec.softcap or 0.0, return_attn_probs=True, block_table=case.block_table)
        return out, _lse_tokens_first(lse, case)


class FlashAttn3(FlashAttentionBackend):
    def run(self, case: Case):
        out, lse, *_ = self.lib().flash_attn_with_kvcache(
            case.q, case.k_cache, case.v_cache, cache_seqlens=case.seq_lens, page_table=case.block_table,
            cu_seqlens_q=case.query_start_loc, max_seqlen_q=case.max_query_len, softmax_scale=case.scale,
            causal=case.spec.causal, window_size=_window(case), softcap=case.spec.softcap or 0.0,
            return_softmax_lse=True)
        return out, _lse_tokens_first(lse, case)


class FlashAttn4(FlashAttentionBackend):
    # Seen on an H200 (results/h200-flash-attn4-gpu-profile.md): not causal, head dims 65-96 take 192x144 tiles
    # on sm_90, and pages of another size than 144 load through cp.async, by waves of rows that do not divide 144.
    known_failures = (KnownFailure(
        cases="encoder_prefill-*-d80*", link="https://github.com/Dao-AILab/flash-attention/pull/2615",
        expires="2027-03-01", compute_capability=(9, 0),
        reason="flash-attn-4 4.0.0b36 on sm_90, not causal, head_dim 80, paged through cp.async: a 144-key tile that "
               "its 128 loading threads do not divide (the guard proposed upstream refuses it); wrong output, NaN in "
               "fp16"),)

    def unsupported(self, spec, device):
        d = spec.heads.head_dim
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10 and not (d <= 128 or d == 256):
            return f"head_dim {d}: FA4 on sm_100+ takes head dims <= 128 or 256"
        return None

    def run(self, case: Case):
        window = tuple(None if w < 0 else w for w in _window(case))  # FA4 says unbounded with None
        out, lse = self.lib().flash_attn_varlen_func(
            case.q, case.k_cache, case.v_cache, cu_seqlens_q=case.query_start_loc, max_seqlen_q=case.max_query_len,
            seqused_k=case.seq_lens, page_table=case.block_table, softmax_scale=case.scale,
            causal=case.spec.causal, window_size=window, learnable_sink=case.sinks,
            softcap=case.spec.softcap or 0.0, return_lse=True)
        return out, _lse_tokens_first(lse, case)


class FlashAttnVllm(FlashAttentionBackend):
    """vLLM's build: one varlen function for FA2 and FA3, chosen by fa_version."""

    def __init__(self, name: str, fa_version: int, caps: dict, module: str = "vllm.vllm_flash_attn"):
        super().__init__(name, module, f"vLLM's FlashAttention-{fa_version} build ({module}) flash_attn_varlen_func "
                         "with block_table and seqused_k", dict(block_size_multiple=16, **caps),
                         finite_poison=fa_version == 3)  # as flash-attn3, below
        self.fa_version = fa_version

    def unavailable(self):
        """Its interface module records why an extension did not load (an ABI mismatch, FA3 off
        Hopper builds), whether the package then imports (the other one loaded) or not (neither)."""
        missing = super().unavailable()
        interface = sys.modules.get(f"{self.module}.flash_attn_interface")
        if interface is None or getattr(interface, f"FA{self.fa_version}_AVAILABLE", True):
            return missing
        why = getattr(interface, f"FA{self.fa_version}_UNAVAILABLE_REASON", "no reason given")
        return f"{self.module} has no FA{self.fa_version} extension ({why})"

    def run(self, case: Case):
        out, lse = self.lib().flash_attn_varlen_func(
            case.q, case.k_cache, case.v_cache, max_seqlen_q=case.max_query_len, cu_seqlens_q=case.query_start_loc,
            max_seqlen_k=case.max_seq_len, seqused_k=case.seq_lens, block_table=case.block_table,
            softmax_scale=case.scale, causal=case.spec.causal, window_size=list(_window(case)),
            softcap=case.spec.softcap or 0.0, return_softmax_lse=True, fa_version=self.fa_version,
            s_aux=None if case.sinks is None else case.sinks.bfloat16())  # its FA3 takes bf16 sinks only
        return out, _lse_tokens_first(lse, case)


@functools.cache
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn
    return frozenset(inspect.signature(varlen_attn).parameters)


class FlashTorch(FlashAttentionBackend):
    """torch.nn.attention.varlen.varlen_attn; what it takes is read from its signature."""

    def __init__(self):
        try:
            params = _varlen_params()
        except ImportError:
            params = frozenset()
        self.paged = "block_table" in params
        super().__init__(
            "flash-torch", "torch.nn.attention.varlen",
            "torch's FlashAttention (torch.nn.attention.varlen.varlen_attn) " + (
                "reading pages through block_table + seqused_k" if self.paged else
                "over pages gathered into the ragged layout first (this torch's varlen_attn takes no block_table)"),
            dict(compute_capability=((8, 0), (12, 1)), features=DEFAULT_FEATURES - {"softcap"} | {"empty_sequences"},
                 kv_layouts=frozenset({"nhd"}) if self.paged else ALL_KV_LAYOUTS))

    def unsupported(self, spec, device):
        if self.paged and spec.block_size % 256:
            return f"block size {spec.block_size}: FlashAttention-2's paged kernels take pages of a multiple of 256"
        if spec.sliding_window and "window_size" not in _varlen_params():
            return "this torch's varlen_attn has no window_size"
        return None

    def run(self, case: Case):
        from torch.nn.attention.varlen import AuxRequest, varlen_attn

        params = _varlen_params()
        kw = dict(scale=case.scale, return_aux=AuxRequest(lse=True))
        if "window_size" in params:
            kw["window_size"] = _window(case) if case.spec.sliding_window else ((-1, 0) if case.spec.causal else (-1, -1))
        else:
            kw["is_causal"] = case.spec.causal
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        if self.paged:
            k, v, cu_seqlens_k = case.k_cache, case.v_cache, None
            kw.update(seqused_k=case.seq_lens, block_table=case.block_table)
        else:
            k, v, starts = gather_kv(case)
            cu_seqlens_k = starts.to(torch.int32)
        out, lse = varlen_attn(case.q, k, v, case.query_start_loc, cu_seqlens_k, case.max_query_len,
                               case.max_seq_len, **kw)
        return out, _lse_tokens_first(lse, case)


register_backend(FlashAttn2(
    "flash-attn2", "flash_attn", "FlashAttention-2 (flash_attn) flash_attn_varlen_func with block_table",
    dict(compute_capability=((8, 0), (12, 1)), block_size_multiple=256)))
# FA3 loads pages by TMA when their size is a multiple of its tile's keys and max_seqlen_q x group exceeds
# its tile's queries (get_pagedkv_tma): whole pages, past seqused_k too, masked by P = 0, so NaN poison
# leaks (vLLM zeroes its caches). Seen through vLLM's build on an H200: all-NaN outputs on exactly those cases.
register_backend(FlashAttn3(
    "flash-attn3", "flash_attn_interface",
    "FlashAttention-3 (flash_attn_interface) flash_attn_with_kvcache: varlen queries over a page table",
    dict(compute_capability=((9, 0), (9, 0))), finite_poison=True))
register_backend(FlashAttn4(
    "flash-attn4", "flash_attn.cute",
    "FlashAttention-4 (flash_attn.cute) flash_attn_varlen_func with page_table and seqused_k",
    dict(compute_capability=((9, 0), (11, 0)), features=DEFAULT_FEATURES | {"sinks"}),
    # Its TMA page loads need finite values past seqused_k in a last page (its docstring).
    finite_poison=True))
# vLLM's own checks (FlashAttentionBackend): sm_80+, fp16/bf16, head dims a multiple of 8 up to 256,
# pages of a multiple of 16, sinks from FA3 on; FA3 runs on sm_90 only.
register_backend(FlashAttnVllm("vllm-fa2", 2, dict(compute_capability=((8, 0), (12, 1)))))
register_backend(FlashAttnVllm("vllm-fa3", 3, dict(compute_capability=((9, 0), (9, 0)),
                                                   features=DEFAULT_FEATURES | {"sinks"})))
register_backend(FlashTorch())
