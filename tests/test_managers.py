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


def test_manager_contract(kv_manager):
    """kv_manager: each registered manager class (the plugin parametrizes it)."""
    pytest.importorskip("hypothesis", reason="the manager contract runs on hypothesis (pip install hypothesis)")
    from hypothesis.stateful import run_state_machine_as_test

    from conformance.manager_checks import contract

    run_state_machine_as_test(contract(kv_manager))


def test_manager_rollout(kv_manager):
    result = Runner("cpu", manager=kv_manager).run(get_backend("sdpa"), MANAGER_ROLLOUT)
    assert result.status == Status.PASS, result.reason
