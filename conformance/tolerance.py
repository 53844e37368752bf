"""The pass rule, calibrated per case to the dtype's own noise (as flash-attn's tests do).

pass iff max|out - ref| <= k * max|ref_lowp - ref| + floor(dtype)

ref is the float64 ground truth, ref_lowp the same math rounded like a kernel in the case's
dtype. A backend may be a bit noisier than ref_lowp (k = 2), never much noisier. The floor covers
cases where ref_lowp happens to be exact (e.g. a single visible key). NaN or Inf in any output
row fails outright.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Half an ulp at 1.0 is the least a correctly rounded output can be off; these are about one ulp.
FLOORS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DEFAULT_K = 2.0


@dataclass(frozen=True)
class Tolerance:
    """A backend's override of the rule; `reason` is required so every loosening is explained."""

    reason: str
    k: float = DEFAULT_K
    floor_scale: float = 1.0  # multiplies the dtype's floor

    def __post_init__(self):
        if not self.reason or not self.reason.strip():
            raise ValueError("Tolerance.reason = '': an override must say why the backend needs it")
        if self.k < 1 or self.floor_scale < 1:
            raise ValueError(f"Tolerance(k={self.k}, floor_scale={self.floor_scale}): overrides may only loosen "
                             "(k >= 1, floor_scale >= 1); a tighter rule belongs in the default")


DEFAULT_TOLERANCE = Tolerance(reason="default: noise-calibrated, k = 2")


@dataclass(frozen=True)
class Comparison:
    err: float  # max |out - ref| over finite entries
    ref_err: float  # max |ref_lowp - ref|
    tol: float  # k * ref_err + floor
    nonfinite: int  # entries of out that are NaN or Inf
    worst: tuple[int, ...]  # index of the largest error (or of the first non-finite entry)

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and self.err <= self.tol

    @property
    def ratio(self) -> float:
        """err / tol: at most 1 passes."""
        return self.err / self.tol if self.tol > 0 else float("inf")


def compare(out: torch.Tensor, ref: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype,
            tolerance: Tolerance = DEFAULT_TOLERANCE) -> Comparison:
    """out, ref_lowp: the backend's and the low-precision reference's values; ref: float64 truth.
    Entries where ref is -inf (LSE of a row that sees no key) must be -inf in out too."""
    ref = ref.to(torch.float64)
    out = out.to(torch.float64)
    ref_lowp = ref_lowp.to(torch.float64)
    both_neg_inf = torch.isneginf(ref) & torch.isneginf(out)
    bad = ~torch.isfinite(out) & ~both_neg_inf
    nonfinite = int(bad.sum())
    diff = torch.where(both_neg_inf, torch.zeros_like(out), (out - ref).abs())
    diff = torch.where(bad, torch.zeros_like(diff), diff)
    # A finite output where the truth is -inf is as wrong as it gets.
    diff = torch.where(torch.isneginf(ref) & torch.isfinite(out), torch.full_like(diff, float("inf")), diff)
    ref_diff = torch.where(torch.isneginf(ref), torch.zeros_like(ref), (ref_lowp - ref).abs())
    ref_diff = torch.nan_to_num(ref_diff, nan=0.0, posinf=0.0)
    if not out.numel():
        return Comparison(err=0.0, ref_err=0.0, tol=_tol(0.0, dtype, tolerance), nonfinite=0, worst=())
    # One transfer from the device, not one per number: on a GPU shared by many workers each sync waits its turn.
    stats = torch.stack([bad.sum().to(torch.float64), diff.max(), ref_diff.max(),
                         torch.argmax(bad.flatten().to(torch.uint8)).to(torch.float64),
                         torch.argmax(diff.flatten()).to(torch.float64)])
    nonfinite, err, ref_err, first_bad, largest = stats.tolist()
    flat = int(first_bad if nonfinite else largest)
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), out.shape))
    return Comparison(err=err, ref_err=ref_err, tol=_tol(ref_err, dtype, tolerance), nonfinite=int(nonfinite),
                      worst=worst)


def _tol(ref_err: float, dtype: torch.dtype, tolerance: Tolerance) -> float:
    return tolerance.k * ref_err + FLOORS[dtype] * tolerance.floor_scale


def ulp_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest difference between a and b (finite, one dtype) in units in the last place at
    b's scale: the spacing of the dtype's floats at b's largest magnitude. 0 only when they are
    equal, at least 1 otherwise. (Counting the floats between each pair instead would call rounding
    noise on values near 0, where floats lie densely, thousands of ULPs.)"""
    if torch.equal(a, b):
        return 0
    diff, scale = (a.double() - b.double()).abs().max(), b.double().abs().max()
    ulp = 2.0 ** math.floor(math.log2(max(float(scale), torch.finfo(b.dtype).tiny))) * torch.finfo(b.dtype).eps
    return max(1, math.ceil(float(diff) / ulp))
