"""The rules every Triton adapter needs, public so an adapter of your own applies them too.

Triton has no CPU target: on a machine without CUDA its kernels run under the interpreter
(TRITON_INTERPRET=1, which importing `conformance` sets there), which needs numpy, gets bf16 wrong
(it computes on the raw bits; upstream will not fix it) and runs each program in Python. Use them
as an adapter's `unavailable()` and `unsupported()`:

    class MyTritonKernel(Backend):
        def unavailable(self):
            return super().unavailable() or no_triton_here()

        def unsupported(self, spec, device):
            return interpreter_refuses(spec, device)
"""
from __future__ import annotations

import importlib.util
import os

import torch


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def no_triton_here() -> str | None:
    """Why Triton kernels cannot run on this machine (beyond a missing triton), or None."""
    if not torch.cuda.is_available() and not _interpreted():
        return "no CUDA and TRITON_INTERPRET is off (Triton runs on CPU only under its interpreter)"
    if _interpreted() and importlib.util.find_spec("numpy") is None:
        return "numpy is not installed (Triton's interpreter needs it: pip install numpy, or the [triton] extra)"
    return None


# Under the interpreter, batches with more sequences or new tokens than these run plain only, and
# variants run at this block size only (each case costs about a second of Python there).
INTERPRETED_MAX_SEQUENCES = 16
INTERPRETED_MAX_NEW_TOKENS = 128
INTERPRETED_VARIANT_BLOCK_SIZE = 16


def interpreter_refuses(spec, device) -> str | None:
    """Why Triton cannot run `spec` on `device` when the device is the CPU, or None: the
    interpreter must be on, bf16 is what it gets wrong, and it runs each program in Python (about
    10 s for a case of 32-48 sequences or 256 new tokens, a second for a small one), so big batches
    run plain only there, and the variants at one block size."""
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
    if spec.block_size != INTERPRETED_VARIANT_BLOCK_SIZE and not spec.is_plain:
        return (f"under Triton's interpreter variants run at block size {INTERPRETED_VARIANT_BLOCK_SIZE} only (block "
                f"size {spec.block_size} runs plain here: about a second a case on a CPU); all are covered on the GPU")
    return None
