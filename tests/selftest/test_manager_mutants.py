"""Every rule of the manager contract catches the bug it exists for: each broken manager fails it,
and the failure comes with the shrunk steps as a script to replay. A bug that corrupts what
attention reads also shows end to end, as wrong log-probabilities of a rollout."""
import manager_mutants
import pytest

from conformance import Category, Runner, Status, get_backend
from fixtures import MANAGER_ROLLOUT


@pytest.mark.parametrize("broken, machine", [pytest.param(m, c, id=m.name) for m, c in
                                             [(manager_mutants.mutant(bug), "contract") for bug in manager_mutants.BUGS]
                                             + [(manager_mutants.RingWrapsEarly, "ring_contract"),
                                                (manager_mutants.HybridFreesEarly, "hybrid_contract")]])
def test_manager_mutant_is_caught(broken, machine, record_property):
    """machine: the contract of manager_checks that holds `broken`'s protocol (it needs hypothesis)."""
    pytest.importorskip("hypothesis", reason="the manager contract runs on hypothesis (pip install hypothesis)")
    from hypothesis.stateful import run_state_machine_as_test

    from conformance import manager_checks

    record_property("mutant", broken.name)
    with pytest.raises(Exception) as failure:
        run_state_machine_as_test(getattr(manager_checks, machine)(broken))
    found = getattr(failure.value, "exceptions", [failure.value])  # hypothesis may find several distinct failures
    script = "\n".join(note for e in found for note in getattr(e, "__notes__", []))
    assert "state = " in script and "state.teardown()" in script, script  # the steps, replayable


@pytest.mark.parametrize("bug", ["double_free", "fork_without_reference", "no_copy_on_write"])
def test_a_manager_bug_shows_as_wrong_attention(bug):
    result = Runner("cpu", manager=manager_mutants.mutant(bug)).run(get_backend("sdpa"), MANAGER_ROLLOUT)
    assert result.status == Status.FAIL and Category.WRONG_LOGPROBS in result.categories, result.reason
