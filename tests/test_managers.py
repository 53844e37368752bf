"""Every registered KV-cache manager (conformance/managers.py), held to the contract
(conformance/manager_checks.py) and run end to end: it hands out the blocks of a GRPO rollout whose
attention runs through a backend, judged against the float64 model.

    pytest -k manager                                  all of them
    pytest -k "manager and reference" --hypothesis-profile conformance-nightly   more runs, longer
    pytest -k manager --attn-load my_package.managers  a manager of yours
"""
import pytest

from conformance import Runner, Status, get_backend
from conformance.fixtures import MANAGER_ROLLOUT, WINDOW_ROLLOUT


# kv_manager, ring_manager, hybrid_manager: each registered manager class of that protocol (the
# plugin parametrizes them; one whose library is missing skips with the reason).


def test_manager_contract(kv_manager):
    _run("contract", kv_manager)


def test_ring_manager_contract(ring_manager):
    _run("ring_contract", ring_manager)


def test_hybrid_manager_contract(hybrid_manager):
    _run("hybrid_contract", hybrid_manager)


# The rollouts (conformance/rollout.py) whose blocks the manager hands out: a paged manager's with
# shared prompts (forks, copy-on-write) and with a sliding window (its tables for every layer); a
# ring buffer's and a hybrid manager's with the window (they have no fork).
@pytest.mark.parametrize("rollout", [MANAGER_ROLLOUT, WINDOW_ROLLOUT], ids=["shared_prompts", "sliding_window"])
def test_manager_rollout(kv_manager, rollout):
    _roll_out(kv_manager, rollout)


def test_ring_manager_rollout(ring_manager):
    _roll_out(ring_manager, WINDOW_ROLLOUT)


def test_hybrid_manager_rollout(hybrid_manager):
    _roll_out(hybrid_manager, WINDOW_ROLLOUT)


def _roll_out(manager, rollout):
    result = Runner("cpu", manager=manager).run(get_backend("sdpa"), rollout)
    assert result.status == Status.PASS, result.reason


def _run(contract: str, manager):
    """Run a contract of manager_checks (contract, ring_contract, hybrid_contract) on the manager."""
    pytest.importorskip("hypothesis", reason="the manager contract runs on hypothesis (pip install hypothesis)")
    from hypothesis.stateful import run_state_machine_as_test

    from conformance import manager_checks

    run_state_machine_as_test(getattr(manager_checks, contract)(manager))
