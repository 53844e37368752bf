"""A case's inputs and references, prepared once and shared by every backend run on it in a row."""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable

import torch

from .costs import phase
from .kinds import make_inputs, reference_attention
from .memory import SMALL_CASE
from .paged import Pages
from .reference import Reference
from .spec import CaseSpec


class Prepared:
    """A case's inputs (Inputs, or MLAInputs for an MLA case) and its references, computed when first
    judged against (a graph case's captured batch never is)."""

    def __init__(self, inputs: Pages):
        self.inputs = inputs

    @functools.cached_property
    def ref(self) -> Reference:
        return self._reference("float64")

    @functools.cached_property
    def ref_lowp(self) -> Reference:
        return self._reference("lowp")

    @functools.cached_property
    def ref_tf32(self) -> Reference:  # an fp32 case computed as by TF32 matmuls (reference.to_tf32)
        return self._reference("tf32")

    def _reference(self, precision: str) -> Reference:
        with phase("reference"):
            return reference_attention(self.inputs, precision)


class PreparedCases:
    """The last few prepared cases of one device and base seed, so several backends run on the same
    case in a row compute its references once. A big case (`size` over SMALL_CASE bytes) is kept
    alone; on_clear() is called when every case was dropped for one."""

    def __init__(self, device: torch.device, base_seed: int, size: Callable[[CaseSpec], int], keep: int = 2,
                 on_clear: Callable[[], None] = lambda: None):
        self.device, self.base_seed, self.size, self.keep, self.on_clear = device, base_seed, size, keep, on_clear
        self._cases: OrderedDict[CaseSpec, Prepared] = OrderedDict()

    def __call__(self, spec: CaseSpec) -> Prepared:
        if spec not in self._cases:
            self.make_room(spec)
            with phase("inputs"):
                self._cases[spec] = Prepared(make_inputs(spec, self.device, spec.seed(self.base_seed)))
        self._cases.move_to_end(spec)
        return self._cases[spec]

    def __iter__(self):
        return iter(self._cases)

    def make_room(self, spec: CaseSpec) -> None:
        """Drop the prepared cases `spec` will not keep company with: all of them beside a big case,
        else the oldest past `keep`."""
        if spec in self._cases or not self._cases:
            return
        if max(self.size(spec), *map(self.size, self._cases)) > SMALL_CASE:
            self.clear()
            self.on_clear()
        elif len(self._cases) >= self.keep:
            self._cases.popitem(last=False)

    def clear(self) -> None:
        self._cases.clear()
