"""Run one backend on one case: the only place where a Result is made. The runner admits the case
into the GPU's memory, lends its call mode a Context (modes/) to run it on, and turns what the mode
judged, or the refusal that ended it, into the Result."""
from __future__ import annotations

import dataclasses

import torch

from .costs import phase, timing
from .known import known_failure
from .managers import RefCountedBlocks
from .memory import SMALL_CASE, DeviceMemory, shrink_local_memory, too_big
from .modes import Context, Refused, case_bytes, mode_of
from .modes.base import error_text
from .prepared import Prepared, PreparedCases
from .probe import declared
from .registry import Backend
from .result import Category, Result, Status, Verdict, failed, identify
from .spec import CaseSpec

class Runner:
    """Runs cases on one device. Keeps the last few prepared cases (PreparedCases), so running several
    backends on the same case in a row computes its references once. On CUDA, every case is admitted
    into the GPU's memory ledger first (memory.DeviceMemory), so processes sharing the GPU wait for
    room instead of running out."""

    def __init__(self, device: str | torch.device = "cpu", base_seed: int = 0, keep: int = 2,
                 finite_poison: bool = False, manager: type = RefCountedBlocks):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # libraries that launch on the current GPU (Triton) follow the case's
        self.base_seed = base_seed
        # Poison unused cache slots with a large finite value for every backend, not NaN: then only
        # reads that change the output fail (a backend's own finite_poison says the same for itself).
        self.finite_poison = finite_poison
        self.manager = manager  # what hands out the blocks of rollouts: a class of a protocol of managers.py
        self.results: list[Result] = []  # every result of this runner, in order (reports are written from it)
        self.cases = PreparedCases(self.device, base_seed, case_bytes, keep, on_clear=self._give_back)
        self.memory = DeviceMemory.of(self.device) if self.device.type == "cuda" else None
        self.on_waiting = lambda: None  # called when a case starts to wait for GPU memory ...
        self.on_admitted = lambda: None  # ... and when it got it

    def prepared(self, spec: CaseSpec) -> Prepared:
        return self.cases(spec)

    def run(self, backend: Backend, spec: CaseSpec) -> Result:
        result = finish(self._run(backend, spec), backend, spec, self.device)
        self.results.append(result)
        return result

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        pass  # nothing to release; IsolatedRunner stops its worker here

    def _run(self, backend: Backend, spec: CaseSpec) -> Result:
        who = identify(backend.name, spec, self.device, self.base_seed)
        mode = mode_of(spec)
        refused = refusal(backend, spec, self.device)
        if refused:
            return Result.of(who, refused)
        with timing() as watch:
            measured = self._admit(spec, backend) if self.memory else {}
            ctx = Context(backend, self.device, self.cases, self.finite_poison, self.manager)
            try:
                judged = mode.run(ctx, spec)
                verdict = judged.verdict()
                measured.update(judged.numbers.fields())
            except Refused as e:  # the adapter refused the call, raised or returned something wrong
                verdict = e.verdict
            except torch.OutOfMemoryError as e:  # the machine's limit, not the backend's fault: say so, go on
                self.cases.clear()  # (the backend's own OOM is its ERROR)
                verdict = failed(Category.OUT_OF_MEMORY, f"the case does not fit in memory here: {error_text(e)}")
            measured.update(watch.fields())
        if self.memory:
            measured["memory_peak"] = torch.cuda.max_memory_allocated(self.device)
        self._release()  # the case's cache is gone with the mode's frame: the memory can go back
        return Result.of(who, verdict, **measured)

    def _admit(self, spec: CaseSpec, backend: Backend) -> dict:
        """Wait for room for the backend's run of the case in the GPU's memory ledger; its estimate,
        as measured."""
        self.cases.make_room(spec)  # a process waiting for memory holds no case it will not run again
        self.memory.settle(torch.cuda.memory_allocated(self.device))
        need = case_bytes(spec, backend.capabilities.cache_copies)
        with phase("wait"):
            if self.memory.admit(need, self.on_waiting):  # waits for room on the GPU
                self.on_admitted()
        torch.cuda.reset_peak_memory_stats(self.device)
        return {"memory_estimate": need}

    def _release(self) -> None:
        """After a case: the memory it no longer needs, and the claim on it, back to the GPU."""
        self._give_back()
        if self.memory:
            shrink_local_memory()
            self.memory.settle(torch.cuda.memory_allocated(self.device))  # what stays prepared

    def _give_back(self) -> None:
        """Other processes on the GPU may be waiting for the memory of a big case, which a caching
        allocator would keep reserved."""
        if self.memory and torch.cuda.memory_reserved(self.device) > SMALL_CASE:
            torch.cuda.empty_cache()


def refusal(backend: Backend, spec: CaseSpec, device: torch.device) -> Verdict | None:
    """A SKIP (the backend does not take a call the case makes, or the case cannot fit here, with
    every reason) or an ERROR (its rules raised), decided without running anything; None when the
    case is to run."""
    mode = mode_of(spec)
    try:
        reason = mode.refusal(backend, spec, device) or too_big(case_bytes(spec, backend.capabilities.cache_copies),
                                                                device)
    except Exception as e:  # noqa: BLE001 - a broken capability rule is the adapter's error, not the run's end
        return failed(Category.ADAPTER_RAISED, f"{backend.name}.skip_reason raised {error_text(e)}")
    return Verdict(Status.SKIP, reason) if reason else None


def finish(result: Result, backend: Backend, spec: CaseSpec, device: torch.device) -> Result:
    """`result` with what the backend declares of the case: the refusal a probe overrides and the
    matching known failure. Every runner's results go through it, whoever made them (a crash or a
    timeout that IsolatedRunner makes itself too), so a listed failure is an XFAIL either way.
    Idempotent: it only reads the backend's declarations."""
    return dataclasses.replace(result, probe=declared(backend, spec, device),
                               known_failure=known_failure(backend, spec.id, device))
