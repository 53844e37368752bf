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


@pytest.fixture
def manager(kv_manager):
    """kv_manager: each registered paged manager class (the plugin parametrizes it, ring_manager
    likewise); skipped with the reason where its library is missing."""
    return _available(kv_manager)


def test_manager_contract(manager):
    _run("contract", manager)


def test_ring_manager_contract(ring_manager):
    _run("ring_contract", _available(ring_manager))


def test_hybrid_manager_contract(hybrid_manager):
    _run("hybrid_contract", _available(hybrid_manager))


def test_manager_rollout(manager):
    result = Runner("cpu", manager=manager).run(get_backend("sdpa"), MANAGER_ROLLOUT)
    assert result.status == Status.PASS, result.reason


def _available(manager):
    why = manager.unavailable()
    if why:
        pytest.skip(why)
    return manager


def _run(contract: str, manager):
    """Run a contract of manager_checks (contract, ring_contract) on the manager."""
    pytest.importorskip("hypothesis", reason="the manager contract runs on hypothesis (pip install hypothesis)")
    from hypothesis.stateful import run_state_machine_as_test

    from conformance import manager_checks

    run_state_machine_as_test(getattr(manager_checks, contract)(manager))
