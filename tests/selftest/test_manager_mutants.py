"""Every rule of the manager contract catches the bug it exists for: each broken manager fails it,
and the failure comes with the shrunk steps as a script to replay. A bug that corrupts what
attention reads also shows end to end, as wrong log-probabilities of a rollout."""
import re

import manager_mutants
import pytest

from conformance import Category, Runner, Status, get_backend
from conformance.managers import HybridBlocks, RingSlots
from conformance.fixtures import MANAGER_ROLLOUT, WINDOW_ROLLOUT


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


@pytest.mark.parametrize("broken, rollout", [
    *[pytest.param(manager_mutants.mutant(bug), MANAGER_ROLLOUT, id=bug)
      for bug in ("double_free", "fork_without_reference", "no_copy_on_write")],
    pytest.param(manager_mutants.RingWrapsEarly, WINDOW_ROLLOUT, id="ring_wraps_early"),
    pytest.param(manager_mutants.HybridFreesEarly, WINDOW_ROLLOUT, id="hybrid_frees_early")])
def test_a_manager_bug_shows_as_wrong_attention(broken, rollout):
    """Another request's keys (a block shared or reused too soon) or the null block's poison (a
    window's block or slot given back too soon) reach the log-probabilities."""
    result = Runner("cpu", manager=broken).run(get_backend("sdpa"), rollout)
    assert result.status == Status.FAIL, result.reason
    assert {Category.WRONG_LOGPROBS, Category.NONFINITE} & set(result.categories), result.reason


@pytest.mark.parametrize("manager, rollout, field", [(RingSlots, MANAGER_ROLLOUT, "CaseSpec.sliding_window = None"),
                                                     (HybridBlocks, MANAGER_ROLLOUT.replace(sliding_window=6),
                                                      "CaseSpec.batch.shared_prefix_lens = (21, 18)")])
def test_a_manager_that_cannot_run_a_rollout_is_a_usage_error(manager, rollout, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        Runner("cpu", manager=manager).run(get_backend("sdpa"), rollout)
