"""What every call mode is and has: the CallMode interface, and the Context a runner lends a mode
to run a case with (the backend's checked, timed call and the prepared cases)."""
from __future__ import annotations

import traceback

import torch

from ..costs import backend_phase, phase
from ..judge import Judgment
from ..memory import call_bytes
from ..paged import PagedBatch
from ..prepared import Prepared, PreparedCases
from ..registry import Backend, Unsupported
from ..result import Category, Status, Verdict, failed
from ..spec import CaseSpec, SpecError


class CallMode:
    """One way a case reaches a backend (CaseSpec.calls names it). A mode says which calls a case
    makes (each a one-call CaseSpec, for the backend's rules), checks the cases it can run, estimates
    their memory, and runs a case on a Context, returning its Judgment."""

    name: str = ""
    description: str = ""  # for people: what it does, in a line (docs/profiles.md lists the modes)
    sparse = False  # it can run sparse cases (CaseSpec.topk): their index lists are drawn for the whole batch
    non_causal = False  # it can run non-causal cases (a chunk's queries would see tokens not yet in the cache)

    def check(self, spec: CaseSpec) -> None:
        """Raise SpecError, naming the field, the value and the rule, when `spec` is no case of this mode."""
        if spec.topk is not None and not self.sparse:
            raise SpecError(f"CaseSpec.topk = {spec.topk!r}: needs calls='one' (its index lists are drawn per query "
                            f"of the whole batch), not {spec.calls!r}")
        if not spec.causal and not self.non_causal:
            raise SpecError(f"CaseSpec.calls = {spec.calls!r}: needs a causal case (a chunk's queries would see "
                            f"tokens not yet in the cache)")

    def calls(self, spec: CaseSpec) -> list[tuple[str, CaseSpec]]:
        """Every call the case makes that a backend's rules must accept, as (which, the call's case in one call)."""
        raise NotImplementedError

    def refusal(self, backend: Backend, spec: CaseSpec, device: torch.device) -> str | None:
        """Why `backend` does not take a call the case must make (the first refused one, named), or None."""
        for which, call in self.calls(spec):
            why = backend.skip_reason(call, device)
            if why:
                return f"{which}: {why}" if which else why
        return None

    def memory(self, spec: CaseSpec, cache_copies: float) -> int:
        """An upper estimate of the device memory the case takes with an adapter that makes
        `cache_copies` copies of the cache (memory.call_bytes for one call)."""
        return call_bytes(spec, cache_copies)

    def run(self, ctx: "Context", spec: CaseSpec) -> Judgment:
        """Run the backend on the case in this mode's calls and judge it. An adapter's refusal,
        exception or bad return raises Refused (through Context.timed)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<call mode {self.name}>"


class Refused(Exception):
    """A call ended the run before any judging: the Verdict its exception means."""

    def __init__(self, verdict: Verdict):
        super().__init__(verdict.reason)
        self.verdict = verdict


class BadOutput(Exception):
    pass


class Context:
    """What a mode runs one backend on one case with: the runner's device and prepared cases, the
    poison for unused slots, the manager of a rollout's blocks, the base seed; and the backend's
    checked call, timed (costs.backend_phase: every timed block is the run's backend time)."""

    def __init__(self, backend: Backend, device: torch.device, prepared: PreparedCases, finite_poison: bool,
                 manager: type):
        self.backend, self.device, self.prepared, self.manager = backend, device, prepared, manager
        self.finite_poison = backend.finite_poison or finite_poison

    @property
    def base_seed(self) -> int:
        return self.prepared.base_seed

    def fresh(self, prep: Prepared) -> PagedBatch:
        """The prepared case's tensors, its cache new and poisoned, its output NaN."""
        with phase("inputs"):
            return prep.inputs.materialize(finite_poison=self.finite_poison)

    def timed(self, calls):
        """What calls() returned, timed as the backend's; an adapter's refusal at call time, bad
        return or exception raises Refused with the verdict it means."""
        self.sync()
        try:
            with backend_phase():
                returned = calls()
        except Unsupported as e:
            raise Refused(Verdict(Status.SKIP, f"refused at call time: {e}")) from None
        except BadOutput as e:
            raise Refused(failed(Category.BAD_RETURN, str(e))) from None
        except Exception as e:  # noqa: BLE001 - an adapter's exception is its result, not the run's end
            raise Refused(failed(Category.ADAPTER_RAISED, error_text(e))) from None
        return returned

    def call(self, case: PagedBatch):
        """One call: the cache write and the attention, and what it returned, checked: (out, lse)."""
        self.backend.write_cache(case)
        returned = self.backend.run(case)
        self.sync()
        return unpack(returned, case, self.backend)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def unpack(returned, case: PagedBatch, backend: Backend):
    """(out, lse) of what run() returned, checked against the case; BadOutput says what is wrong."""
    out, lse = (returned if isinstance(returned, tuple) else (returned, None))
    want = tuple(case.out.shape)
    if not isinstance(out, torch.Tensor):
        raise BadOutput(f"{backend.name}.run returned {type(out).__name__}: must return a tensor or (out, lse)")
    if tuple(out.shape) != want or out.dtype != case.spec.dtype or out.device != case.device:
        raise BadOutput(f"{backend.name}.run output: shape {tuple(out.shape)}, {out.dtype}, {out.device}; "
                        f"must be shape {want}, {case.spec.dtype}, {case.device}")
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != want[:2] or not lse.is_floating_point():
            got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
            raise BadOutput(f"{backend.name}.run lse: {got}; must be a float tensor of shape {want[:2]}")
    elif backend.capabilities.returns_lse:
        raise BadOutput(f"{backend.name}.run returned no lse, but its capabilities declare returns_lse")
    return out, lse


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
