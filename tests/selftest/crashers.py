"""Adapters that take their process down (or hang, or raise), for the isolation self-tests. Not
registered: they reach the worker pickled, and the conformance matrix never meets them."""
from __future__ import annotations

import ctypes
import functools
import os
import time

import torch

from conformance.backends.sdpa import SdpaBackend
from conformance import Backend, Capabilities, Case

CPU_AND_CUDA = Capabilities(devices=frozenset({"cpu", "cuda"}), dtypes=frozenset({torch.float16, torch.float32}))


class Works(SdpaBackend):
    """The sdpa adapter under another name: a correct backend that travels pickled."""

    def __init__(self):
        super().__init__("isolation-works", None)


class Aborts(Backend):
    name, capabilities = "isolation-aborts", CPU_AND_CUDA

    def run(self, case: Case):
        os.abort()


class Hangs(Backend):
    name, capabilities = "isolation-hangs", CPU_AND_CUDA

    def run(self, case: Case):
        time.sleep(3600)


class Segfaults(Backend):
    name, capabilities = "isolation-segfaults", CPU_AND_CUDA

    def run(self, case: Case):
        ctypes.string_at(0)  # reads address 0


class Raises(Backend):
    name, capabilities = "isolation-raises", CPU_AND_CUDA

    def run(self, case: Case):
        raise RuntimeError("an ordinary adapter bug")


class IllegalAccess(Backend):
    """A Triton kernel that loads 4 TiB past its tensor: a sticky CUDA error that poisons the context."""

    name, capabilities = "isolation-illegal-access", Capabilities(devices=frozenset({"cuda"}))

    def run(self, case: Case):
        _out_of_bounds_kernel()[(1,)](case.q, case.out, 1 << 40)
        return case.out


@functools.cache
def _out_of_bounds_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def load_far(x_ptr, out_ptr, offset):
        tl.store(out_ptr, tl.load(x_ptr + offset))

    return load_far


class AbortsDeclaringFp16Only(Aborts):
    """Declares fp32 unsupported: its probe (probe.py) runs an fp32 case anyway, and takes the worker down."""

    name, capabilities = "isolation-aborts-fp16-only", Capabilities(devices=frozenset({"cpu", "cuda"}),
                                                                     dtypes=frozenset({torch.float16}))
