"""Where a run's time goes, by phase: the stopwatch a runner holds while one backend runs one case.

Phases are exclusive, so they add up to the run's wall time: time inside a nested phase counts for
it alone (a fresh cache built inside a backend's timed calls is `inputs`, not `backend`). What no
phase claims is `judge` (comparing, the call mode's bookkeeping). `compile` is not a phase but a
part of `backend`: the seconds torch.compile (dynamo's frame compiles, inductor in them) and
Triton's JIT compiler report for the calls, as their own counters say.
"""
from __future__ import annotations

import contextlib
import functools
import time

PHASES = ("wait", "inputs", "reference", "backend", "judge")  # judge: the rest of the run


class Stopwatch:
    """One run's seconds by phase (PHASES) and its compile seconds."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.compile = 0.0
        self._stack: list[str] = []
        self._mark = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def _switch(self) -> None:
        """The time since the last switch to the innermost open phase (none open: judge)."""
        now = time.perf_counter()
        self.seconds[self._stack[-1] if self._stack else "judge"] += now - self._mark
        self._mark = now

    def fields(self) -> dict[str, float]:
        """The Result's fields of the run so far: each phase's seconds, the compile seconds, and the
        harness's (inputs, references and judging: the run without the backend and the wait)."""
        self._switch()
        s = self.seconds
        return {**{f"{name}_seconds": s[name] for name in PHASES}, "compile_seconds": self.compile,
                "harness_seconds": s["inputs"] + s["reference"] + s["judge"]}


_running: list[Stopwatch] = []  # the stopwatch of the run in progress in this process (a runner's)


@contextlib.contextmanager
def timing():
    """A run's stopwatch; phase() times into it while the run lasts."""
    watch = Stopwatch()
    _running.append(watch)
    try:
        yield watch
    finally:
        _running.remove(watch)


@contextlib.contextmanager
def phase(name: str):
    """Time the block as `name` in the run in progress (outside a run, as in a warm-up: not timed)."""
    if not _running:
        yield
        return
    with _running[-1].phase(name):
        yield


@contextlib.contextmanager
def backend_phase():
    """The backend's calls: the phase `backend`, with the compile seconds the libraries report in it."""
    before = compile_seconds()
    with phase("backend"):
        yield
    if _running:
        _running[-1].compile += compile_seconds() - before


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far, by dynamo's and Triton's own counters (a
    Triton compile inside a torch.compile counts once, in dynamo's)."""
    return _dynamo_seconds() + _triton_listener().seconds


def _dynamo_seconds() -> float:
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return sum(compilation_time_metrics.get("_compile.compile_inner", ()))


class _TritonCompiles:
    """Triton's compilation listener: the seconds of every JIT compile outside a torch.compile,
    chained to a listener someone else installed."""

    def __init__(self, previous):
        self.previous, self.seconds = previous, 0.0

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit):
        from torch._guards import TracingContext
        if TracingContext.try_get() is None:  # inductor's kernels count in dynamo's frame compile
            self.seconds += times.total / 1e6  # CompileTimes, in microseconds
        if self.previous:
            self.previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)


@functools.cache
def _triton_listener() -> _TritonCompiles:
    listener = _TritonCompiles(None)
    try:
        from triton import knobs
    except ImportError:  # no Triton, or one without knobs: only dynamo's counter
        return listener
    if hasattr(knobs, "compilation") and hasattr(knobs.compilation, "listener"):
        listener.previous = knobs.compilation.listener
        knobs.compilation.listener = listener
    return listener
