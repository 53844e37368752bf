"""Every registered KV-cache manager (conformance/managers.py), held to the contract
(conformance/manager_checks.py) and run end to end: it hands out the blocks of a GRPO rollout whose
attention runs through a backend, judged against the float64 model.

    pytest -k manager                                  all of them
    pytest -k "manager and reference" --hypothesis-profile conformance-nightly   more runs, longer
    pytest -k manager --attn-load my_package.managers  a manager of yours
    pytest -k manager --attn-seed 7                    other steps and other rollout data

The contracts' steps and the rollouts' data follow --attn-seed; the rollouts run on the CPU.
"""
import pytest

from conformance import Runner, Status, get_backend
from conformance.fixtures import MANAGER_ROLLOUT, WINDOW_ROLLOUT
from conformance.fixtures.pytest_plugin import option


# kv_manager, ring_manager, hybrid_manager: each registered manager class of that protocol (the
# plugin parametrizes them; one whose library is missing skips with the reason).


def test_manager_contract(kv_manager, pytestconfig):
    _run("contract", kv_manager, pytestconfig)


def test_ring_manager_contract(ring_manager, pytestconfig):
    _run("ring_contract", ring_manager, pytestconfig)


def test_hybrid_manager_contract(hybrid_manager, pytestconfig):
    _run("hybrid_contract", hybrid_manager, pytestconfig)


# The rollouts (conformance/rollout.py) whose blocks the manager hands out: a paged manager's with
# shared prompts (forks, copy-on-write) and with a sliding window (its tables for every layer); a
# ring buffer's and a hybrid manager's with the window (they have no fork).
@pytest.mark.parametrize("rollout", [MANAGER_ROLLOUT, WINDOW_ROLLOUT], ids=["shared_prompts", "sliding_window"])
def test_manager_rollout(kv_manager, rollout, pytestconfig):
    _roll_out(kv_manager, rollout, pytestconfig)


def test_ring_manager_rollout(ring_manager, pytestconfig):
    _roll_out(ring_manager, WINDOW_ROLLOUT, pytestconfig)


def test_hybrid_manager_rollout(hybrid_manager, pytestconfig):
    _roll_out(hybrid_manager, WINDOW_ROLLOUT, pytestconfig)


def _roll_out(manager, rollout, config):
    result = Runner("cpu", base_seed=option(config, "seed"), manager=manager).run(get_backend("sdpa"), rollout)
    assert result.status == Status.PASS, result.reason


def _run(contract: str, manager, config):
    """Run a contract of manager_checks (contract, ring_contract, hybrid_contract) on the manager, its
    steps drawn from the run's seed (the same steps on every run of that seed)."""
    pytest.importorskip("hypothesis", reason="the manager contract runs on hypothesis (pip install hypothesis)")
    from hypothesis import seed
    from hypothesis.stateful import run_state_machine_as_test

    from conformance import manager_checks

    run_state_machine_as_test(seed(option(config, "seed"))(getattr(manager_checks, contract)(manager)))
