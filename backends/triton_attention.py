"""Adapters for our Triton paged attention (backends/triton_kernels.py).

`triton` picks its path by a heuristic (split-KV for decode batches that leave the GPU idle);
`triton-split` takes the split-KV path on every decode case, so both paths are tested on all of them. On a machine
without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math

import torch

from conformance import Backend, Capabilities, Case, register_backend
from conformance.registry import ALL_FEATURES, ALL_KV_LAYOUTS
from conformance.triton_rules import interpreter_refuses, no_triton_here

FORCED_SEGMENTS = 4  # triton-split: full, partial and empty segments even on short CPU cases
MIN_SPLIT_KEYS = 2048  # split only a decode batch whose longest sequence has at least this many keys
MIN_SEGMENT_KEYS = 512  # ... and into segments of at least this many keys of it
MAX_SEGMENTS = 64  # the reduce loads a program's segments as one tile
PROGRAMS_PER_SM = 4  # enough resident programs to keep an SM's memory pipe busy


def choose_segments(case: Case) -> int:
    """Split-KV for a decode batch whose programs (sequences x KV heads) leave SMs idle and whose
    longest sequence is long: enough segments (a power of two) for PROGRAMS_PER_SM programs per SM."""
    if case.device.type != "cuda" or case.max_query_len != 1 or case.max_seq_len < MIN_SPLIT_KEYS:
        return 1
    programs = case.seq_lens.numel() * case.k_cache.shape[2]
    sms = torch.cuda.get_device_properties(case.device).multi_processor_count
    if programs >= sms:
        return 1
    wanted = 1 << max(1, math.ceil(math.log2(PROGRAMS_PER_SM * sms / programs)))
    return min(wanted, MAX_SEGMENTS, 1 << int(math.log2(case.max_seq_len // MIN_SEGMENT_KEYS)))


class TritonBackend(Backend):
    capabilities = Capabilities(
        kv_dtypes=frozenset({"auto", "fp8_e4m3"}),
        kv_layouts=ALL_KV_LAYOUTS,  # the kernels read and write through the caches' strides
        head_dims=frozenset(range(16, 257, 16)),  # padded to a power of two inside; 16..256
        features=ALL_FEATURES,
        returns_lse=True,
        # Launches read every per-batch value from the case's tensors; the grid comes from shapes.
        cuda_graphs=True,
        requires=("triton",),
        cache_copies=0,  # the kernels read the pages in place
    )

    def __init__(self, name: str, split: bool, kernels=None):
        self.name = name
        self.split = split
        self._kernels = kernels  # a module like backends.triton_kernels (self-tests pass broken copies)
        self.description = ("our Triton paged attention, " +
                            ("split-KV path on every decode batch" if split else "split-KV for decode chosen by heuristic"))

    def unavailable(self):
        return super().unavailable() or no_triton_here()

    def unsupported(self, spec, device):
        if self.split and not spec.batch.is_decode:
            return "split-KV is the decode path: batches with prefill tokens take the one-pass kernel (tested as triton)"
        return interpreter_refuses(spec, device)

    def kernels(self):
        if self._kernels is None:
            from conformance.backends import triton_kernels  # imports triton: only once a case runs
            self._kernels = triton_kernels
        return self._kernels

    def write_cache(self, case: Case) -> None:
        self.kernels().write_cache(case.k_new, case.v_new, case.k_cache, case.v_cache, case.slot_mapping,
                               case.k_scale, case.v_scale)

    def run(self, case: Case):
        spec = case.spec
        lse = self.kernels().paged_attention(
            case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.query_start_loc,
            case.max_query_len, case.out, scale=case.scale, causal=spec.causal, window=spec.sliding_window,
            softcap=spec.softcap, sinks=case.sinks, k_scale=case.k_scale, v_scale=case.v_scale,
            num_segments=FORCED_SEGMENTS if self.split else choose_segments(case),
        )
        return case.out, lse


register_backend(TritonBackend("triton", split=False))
register_backend(TritonBackend("triton-split", split=True))
