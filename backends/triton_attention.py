"""Adapters for our Triton paged attention (backends/triton_kernels.py).

`triton` picks its path by a heuristic (split-KV for decode batches that leave the GPU idle);
`triton-split` takes the split-KV path on every decode case, so both paths are tested on all of them. On a machine
without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch

from conformance import Backend, Capabilities, Case, register_backend

SEGMENTS = 16  # split-KV segments the heuristic picks (a power of two: the reduce loads them as one tile)
FORCED_SEGMENTS = 4  # triton-split: full, partial and empty segments even on short CPU cases
MIN_SPLIT_KEYS = 2048  # below this, segments would be too short to pay for the reduce


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    from backends import triton_kernels  # imports triton; only when a case runs
    return triton_kernels


def choose_segments(case: Case) -> int:
    """Split-KV when a decode batch's programs (sequences x KV heads) would not fill the GPU's SMs
    and the longest sequence is long: segments then put the idle SMs to work."""
    if case.device.type != "cuda" or case.max_query_len != 1 or case.max_seq_len < MIN_SPLIT_KEYS:
        return 1
    programs = case.seq_lens.numel() * case.k_cache.shape[2]
    return SEGMENTS if programs < torch.cuda.get_device_properties(case.device).multi_processor_count else 1


class TritonBackend(Backend):
    capabilities = Capabilities(
        kv_dtypes=frozenset({"auto", "fp8_e4m3"}),
        head_dims=frozenset(range(16, 257, 16)),  # padded to a power of two inside; 16..256
        features=frozenset({"causal", "non_causal", "sliding_window", "softcap", "sinks"}),
        returns_lse=True,
        requires=("triton",),
    )

    def __init__(self, name: str, split: bool):
        self.name = name
        self.split = split
        self.description = ("our Triton paged attention, " +
                            ("split-KV path on every decode batch" if split else "split-KV for decode chosen by heuristic"))

    def unavailable(self):
        reason = super().unavailable()
        if reason is None and not torch.cuda.is_available() and not _interpreted():
            return "no CUDA and TRITON_INTERPRET is off (Triton runs on CPU only under its interpreter)"
        return reason

    def unsupported(self, spec, device):
        if self.split and not spec.batch.is_decode:
            return "split-KV is the decode path: batches with prefill tokens take the one-pass kernel (tested as triton)"
        if device.type == "cpu" and spec.dtype == torch.bfloat16:
            return ("bf16 under Triton's interpreter is computed on the raw bits (upstream will not fix it); "
                    "bf16 is covered on the GPU")
        return None

    def write_cache(self, case: Case) -> None:
        _kernels().write_cache(case.k_new, case.v_new, case.k_cache, case.v_cache, case.slot_mapping,
                               case.k_scale, case.v_scale)

    def run(self, case: Case):
        spec = case.spec
        lse = _kernels().paged_attention(
            case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.query_start_loc,
            case.max_query_len, case.out, scale=case.scale, causal=spec.causal, window=spec.sliding_window,
            softcap=spec.softcap, sinks=case.sinks, k_scale=case.k_scale, v_scale=case.v_scale,
            num_segments=FORCED_SEGMENTS if self.split else choose_segments(case),
        )
        return case.out, lse


register_backend(TritonBackend("triton", split=False))
register_backend(TritonBackend("triton-split", split=True))
