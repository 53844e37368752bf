"""Every MLA check must catch the bug it exists for: each MLA mutant FAILs some MLA case of the
default CPU profile, while the same adapter without a bug fails none; and the two forms of the
float64 reference agree."""
import pytest
import torch
from mla_mutants import BUGS, LatentTorch

from conformance import Runner, Status
from conformance.matrix import select_cases
from conformance.mla import make_mla_inputs, mla_reference

MLA_CASES = select_cases("cpu", kind="mla")


@pytest.fixture(scope="module")
def runner():
    return Runner("cpu", keep=len(MLA_CASES))  # the references of the profile, shared by all mutants


def test_correct_adapter_fails_no_case(runner):
    results = [runner.run(LatentTorch(), spec) for spec in MLA_CASES]
    bad = [f"{r.id}: {r.reason}" for r in results if r.status != Status.PASS]
    assert not bad, bad[:5]


@pytest.mark.parametrize("bug", BUGS)
def test_mutant_is_caught(bug, runner):
    mutant = LatentTorch(bug)
    for spec in MLA_CASES:
        result = runner.run(mutant, spec)
        assert result.status != Status.ERROR, result.reason
        if result.status == Status.FAIL:
            return
    pytest.fail(f"MLA mutant {bug} ({BUGS[bug]}) passed all {len(MLA_CASES)} MLA cases of the cpu profile")


@pytest.mark.parametrize("spec", [s for s in MLA_CASES if s.dtype == torch.float32 and s.block_size == 16],
                         ids=lambda s: s.id)
def test_expanded_and_absorbed_forms_agree(spec):
    """The ground truth (expanded MHA) and the absorbed MQA form are one computation in float64."""
    inputs = make_mla_inputs(spec, "cpu", spec.seed())
    expanded, absorbed = (mla_reference(inputs, "float64", form) for form in ("expanded", "absorbed"))
    assert expanded.out.dtype == torch.float64
    torch.testing.assert_close(absorbed.out, expanded.out, rtol=0, atol=1e-12)
    torch.testing.assert_close(absorbed.lse, expanded.lse, rtol=0, atol=1e-12)
    # Outputs O(1) (a softmax-weighted mean of unit-variance values), not vanishing or blowing up.
    assert 0.05 < float(expanded.out.std()) < 2, float(expanded.out.std())
