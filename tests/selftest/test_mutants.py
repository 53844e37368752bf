"""Every check of the suite must catch the bug it exists for: each mutant FAILs some case of the
default CPU profile, while the same adapter without a bug fails none."""
import pytest
from mutants import BUGS, PagedTorch

from conformance import Runner, Status
from conformance.matrix import select_cases

CPU_CASES = select_cases("cpu", kind="mha")


@pytest.fixture(scope="module")
def runner():
    return Runner("cpu", keep=len(CPU_CASES))  # the references of the profile, shared by all mutants


def test_correct_adapter_fails_no_case(runner):
    results = [runner.run(PagedTorch(), spec) for spec in CPU_CASES]
    bad = [f"{r.id}: {r.reason}" for r in results if r.status != Status.PASS]
    assert not bad, bad[:5]


@pytest.mark.parametrize("bug", BUGS)
def test_mutant_is_caught(bug, runner):
    mutant = PagedTorch(bug)
    for spec in CPU_CASES:
        result = runner.run(mutant, spec)
        assert result.status != Status.ERROR, result.reason
        if result.status == Status.FAIL:
            return
    pytest.fail(f"mutant {bug} ({BUGS[bug]}) passed all {len(CPU_CASES)} cases of the cpu profile")
