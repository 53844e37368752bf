"""Every registered KV-cache manager held to the contract (conformance/manager_checks.py):

    pytest -k manager                                  all of them
    pytest -k "manager and reference" --hypothesis-profile conformance-nightly   more runs, longer
    pytest -k manager --load my_package.managers       a manager of yours
"""
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the manager contract runs on hypothesis (pip install hypothesis)")

from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from conformance.manager_checks import contract  # noqa: E402


def test_manager_contract(kv_manager):
    """kv_manager: each registered manager class (the plugin parametrizes it)."""
    run_state_machine_as_test(contract(kv_manager))
