"""Probe mode (`--probe`): run the single-call cases a backend declares unsupported anyway, to see
what its library does with them. A library that accepts a configuration its adapter declares
unsupported and computes it right means the declaration is stricter than it needs to be; one that
accepts it silently and gets it wrong is a real bug class (nothing stops a user who skips the
adapter's rules); one that refuses it (raises) does what was declared.

A probe runs as its own backend, `probe-<name>` (the adapter with its rules lifted),
beside the real one (whose case is a SKIP as usual), so reports keep them apart; Result.probe holds
the declaration that was overridden.
"""
from __future__ import annotations

import torch

from .registry import Backend
from .spec import ONE_CALL, CaseSpec


class Probe(Backend):
    """`backend` with its declared rules lifted: whatever its device and library could run, it runs
    (every call goes to the backend itself). A plain object, so a worker process can take it pickled."""

    def __init__(self, backend: Backend):
        self.declared_by = backend
        self.name, self.kind = f"probe-{backend.name}", backend.kind
        self.description = f"{backend.name}, run on what it declares unsupported"
        self.capabilities, self.tolerance, self.finite_poison = backend.capabilities, backend.tolerance, \
            backend.finite_poison

    def skip_reason(self, spec: CaseSpec, device: torch.device, captured: bool = False) -> str | None:
        real = self.declared_by
        if spec.calls != ONE_CALL:
            return "probes run single-call cases"
        if spec.kind != real.kind or real.unavailable() or device.type not in real.capabilities.devices:
            return real.skip_reason(spec, device, captured)  # it cannot run here at all
        if not real.skip_reason(spec, device, captured):
            return "declared supported: the backend itself runs it"
        return None

    def unavailable(self):
        return self.declared_by.unavailable()

    def compile_key(self, spec):
        return self.declared_by.compile_key(spec)

    def write_cache(self, case):
        return self.declared_by.write_cache(case)

    def run(self, case):
        return self.declared_by.run(case)

    def prepare(self, case):
        return self.declared_by.prepare(case)


def declared(backend: Backend, spec: CaseSpec, device: torch.device) -> str | None:
    """For a probe: the refusal it overrides on `spec`; None for any other backend."""
    real = getattr(backend, "declared_by", None)
    return real.skip_reason(spec, device) if real is not None else None


def probes(pairs: list[tuple[Backend, CaseSpec]], device: torch.device) -> list[tuple[Backend, CaseSpec]]:
    """A probe pair for each pair whose backend declares the case unsupported (one its device and
    library could run)."""
    made: dict[str, Probe] = {}
    for b, _ in pairs:
        if b.name not in made:
            made[b.name] = Probe(b)
    return [(made[b.name], spec) for b, spec in pairs if not made[b.name].skip_reason(spec, device)]
