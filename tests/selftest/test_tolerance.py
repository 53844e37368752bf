"""The pass rule: err <= k * ref_err + floor, NaN/Inf fail, overrides need a reason."""
import math

import pytest
import torch

from conformance import Tolerance, compare
from conformance.tolerance import FLOORS

REF = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)


def _cmp(out, ref_lowp=None, dtype=torch.float16, tol=None):
    ref_lowp = REF + 0.01 if ref_lowp is None else ref_lowp  # ref_err = 0.01
    return compare(out, REF, ref_lowp, dtype, *([tol] if tol else []))


def test_boundary_passes_and_just_above_fails():
    limit = 2 * 0.01 + FLOORS[torch.float16]
    assert _cmp(REF + limit * 0.999).passed
    c = _cmp(REF + limit * 1.001)
    assert not c.passed and c.ratio > 1
    assert c.ref_err == pytest.approx(0.01) and c.tol == pytest.approx(limit)


def test_floor_applies_when_the_lowp_reference_is_exact():
    exact = _cmp(REF + 0.5 * FLOORS[torch.bfloat16], ref_lowp=REF.clone(), dtype=torch.bfloat16)
    assert exact.passed and exact.ref_err == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_output_fails_however_small_the_rest(bad):
    out = REF.clone()
    out[1, 0] = bad
    c = _cmp(out)
    assert not c.passed and c.nonfinite == 1 and c.worst == (1, 0)


def test_worst_points_at_the_largest_error():
    out = REF.clone()
    out[1, 1] += 1.0
    assert _cmp(out).worst == (1, 1)


def test_minus_inf_lse_must_match_exactly():
    ref = torch.tensor([-math.inf, 1.0], dtype=torch.float64)
    assert compare(torch.tensor([-math.inf, 1.0]), ref, ref, torch.float32).passed
    assert not compare(torch.tensor([-30.0, 1.0]), ref, ref, torch.float32).passed


def test_override_loosens_with_a_reason_only():
    loose = Tolerance(reason="accumulates P @ V in fp16", k=4)
    assert _cmp(REF + 0.035, tol=loose).passed and not _cmp(REF + 0.035).passed
    with pytest.raises(ValueError, match="must say why"):
        Tolerance(reason=" ", k=4)
    with pytest.raises(ValueError, match="may only loosen"):
        Tolerance(reason="tighter", k=0.5)
