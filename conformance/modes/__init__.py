"""Call modes: how a case reaches the backend, one object each, looked up in one table by
CaseSpec.calls (as the case kinds are by CaseSpec.kind).

A mode owns everything that differs between the ways of calling: the calls a case makes (what a
backend's rules must accept, and so its refusal with the reason), the cases it can run (its rules),
its memory estimate, how it runs on a prepared case and what it adds to the verdict. The runner,
the memory ledger, the warm-up and the reports ask the mode and never branch on its name; adding a
mode is one module here and one entry in MODES.
"""
from __future__ import annotations

import functools

from ..registry import Capabilities
from ..spec import CALL_MODES, CaseSpec
from .base import CallMode, Context, Refused
from .graph import GRAPH
from .invariance import INVARIANCE
from .one import ONE
from .paths import CHUNKS, TOKENS
from .rollout import ROLLOUT

MODES: dict[str, CallMode] = {mode.name: mode for mode in (ONE, CHUNKS, TOKENS, INVARIANCE, ROLLOUT, GRAPH)}

CALL_MODES.update((name, mode.check) for name, mode in MODES.items())  # every CaseSpec is checked by its mode

__all__ = ["MODES", "CallMode", "Context", "Refused", "case_bytes", "mode_of"]


def mode_of(spec: CaseSpec) -> CallMode:
    """The call mode of `spec` (a CaseSpec's mode checked it when it was made)."""
    return MODES[spec.calls]


@functools.lru_cache(maxsize=16384)  # asked for on every run of a case
def case_bytes(spec: CaseSpec, cache_copies: float = Capabilities.cache_copies) -> int:
    """An upper estimate of the device memory one backend run of `spec` takes, as its mode makes it,
    for an adapter that makes `cache_copies` copies of the cache (its Capabilities.cache_copies; the
    default assumes the most)."""
    return mode_of(spec).memory(spec, cache_copies)
