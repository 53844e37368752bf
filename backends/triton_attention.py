"""Adapters for our Triton paged attention (backends/triton_kernels.py).

`triton` picks its path by a heuristic (split-KV for decode batches that leave the GPU idle);
`triton-split` takes the split-KV path on every decode case, so both paths are tested on all of them. On a machine
without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch

from conformance import Backend, Capabilities, Case, register_backend
from conformance.registry import ALL_FEATURES, ALL_KV_LAYOUTS

FORCED_SEGMENTS = 4  # triton-split: full, partial and empty segments even on short CPU cases
MIN_SPLIT_KEYS = 2048  # split only a decode batch whose longest sequence has at least this many keys
MIN_SEGMENT_KEYS = 512  # ... and into segments of at least this many keys of it
MAX_SEGMENTS = 64  # the reduce loads a program's segments as one tile
PROGRAMS_PER_SM = 4  # enough resident programs to keep an SM's memory pipe busy


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def no_triton_here() -> str | None:
    """Why Triton kernels cannot run on this machine (beyond a missing triton), or None."""
    if not torch.cuda.is_available() and not _interpreted():
        return "no CUDA and TRITON_INTERPRET is off (Triton runs on CPU only under its interpreter)"
    if _interpreted() and importlib.util.find_spec("numpy") is None:
        return "numpy is not installed (Triton's interpreter needs it: pip install numpy, or the [triton] extra)"
    return None


# Under the interpreter, batches with more sequences or new tokens than these run plain only.
INTERPRETED_MAX_SEQUENCES = 16
INTERPRETED_MAX_NEW_TOKENS = 128


def interpreter_refuses(spec, device) -> str | None:
    """Why Triton cannot run `spec` on `device` when the device is the CPU, or None: the
    interpreter must be on, bf16 is what it gets wrong, and it runs each program in Python (about
    10 s for a case of 32-48 sequences or 256 new tokens), so big batches run plain only there."""
    if device.type != "cpu":
        return None
    if not _interpreted():
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1), which is off in this process"
    if spec.dtype == torch.bfloat16:
        return ("bf16 under Triton's interpreter is computed on the raw bits (upstream will not fix it); "
                "bf16 is covered on the GPU")
    big = spec.batch.batch_size > INTERPRETED_MAX_SEQUENCES or spec.batch.num_query_tokens > INTERPRETED_MAX_NEW_TOKENS
    if big and not spec.is_plain:
        return (f"under Triton's interpreter a batch of more than {INTERPRETED_MAX_SEQUENCES} sequences or "
                f"{INTERPRETED_MAX_NEW_TOKENS} new tokens runs plain only (about 10 s a case on a CPU); its variants "
                "are covered on the GPU")
    return None


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
        requires=("triton",),
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
            from backends import triton_kernels  # imports triton: only once a case runs
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
