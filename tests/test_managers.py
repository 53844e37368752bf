"""Every registered KV-cache manager (conformance/managers.py), held to the contract
(conformance/manager_checks.py) and run end to end: it hands out the blocks of a GRPO rollout whose
attention runs through a backend, judged against the float64 model.

    pytest -k manager                                  all of them
    pytest -k "manager and reference" --hypothesis-profile conformance-nightly   more runs, longer
    pytest -k manager --load my_package.managers       a manager of yours
"""
import pytest

from conformance import Runner, Status, get_backend
from fixtures import MANAGER_ROLLOUT


# kv_manager, ring_manager, hybrid_manager: each registered manager class of that protocol (the
# plugin parametrizes them; one whose library is missing skips with the reason).


def test_manager_contract(kv_manager):
    _run("contract", kv_manager)


def test_ring_manager_contract(ring_manager):
    _run("ring_contract", ring_manager)


def test_hybrid_manager_contract(hybrid_manager):
    _run("hybrid_contract", hybrid_manager)


def test_manager_rollout(kv_manager):
    result = Runner("cpu", manager=kv_manager).run(get_backend("sdpa"), MANAGER_ROLLOUT)
    assert result.status == Status.PASS, result.reason


def _run(contract: str, manager):
    """Run a contract of manager_checks (contract, ring_contract, hybrid_contract) on the manager."""
    pytest.importorskip("hypothesis", reason="the manager contract runs on hypothesis (pip install hypothesis)")
    from hypothesis.stateful import run_state_machine_as_test

    from conformance import manager_checks

    run_state_machine_as_test(getattr(manager_checks, contract)(manager))
