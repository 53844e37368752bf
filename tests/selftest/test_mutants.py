"""Every check of the suite must catch the bug it exists for: each mutant FAILs some case of the
default CPU profile of its kind (dense: mutants.py; MLA: mla_mutants.py), while the same adapter
without a bug fails none."""
import mla_mutants
import mutants
import pytest

from conformance import Runner, Status
from conformance.matrix import select_cases

# kind: (the adapter with a `bug` switch, its bugs)
FAMILIES = {"mha": (mutants.PagedTorch, mutants.BUGS), "mla": (mla_mutants.LatentTorch, mla_mutants.BUGS)}
CASES = {kind: select_cases("cpu", kind=kind) for kind in FAMILIES}


@pytest.fixture(scope="module")
def runner():
    return Runner("cpu", keep=sum(map(len, CASES.values())))  # the references of the profile, shared by all mutants


@pytest.mark.parametrize("kind", FAMILIES)
def test_correct_adapter_fails_no_case(kind, runner):
    adapter = FAMILIES[kind][0]()
    results = [runner.run(adapter, spec) for spec in CASES[kind]]
    bad = [f"{r.id}: {r.reason}" for r in results if r.status != Status.PASS]
    assert not bad, bad[:5]


@pytest.mark.parametrize("kind, bug", [(kind, bug) for kind, (_, bugs) in FAMILIES.items() for bug in bugs])
def test_mutant_is_caught(kind, bug, runner):
    adapter, bugs = FAMILIES[kind]
    mutant = adapter(bug)
    for spec in CASES[kind]:
        result = runner.run(mutant, spec)
        assert result.status != Status.ERROR, result.reason
        if result.status == Status.FAIL:
            return
    pytest.fail(f"{kind} mutant {bug} ({bugs[bug]}) passed all {len(CASES[kind])} {kind} cases of the cpu profile")
