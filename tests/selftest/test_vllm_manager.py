"""The vllm-block-pool manager adapter (backends/kv_managers.py) against a stand-in of vLLM's
BlockPool (fake_vllm.py): the translation keeps the manager contract and runs a rollout, and a
broken translation is caught. (With vLLM installed, tests/test_managers.py runs the real pool.)"""
import fake_vllm
import pytest

from conformance.backends.kv_managers import VLLMBlockPool
from conformance import Runner, Status, get_backend
from conformance.fixtures import MANAGER_ROLLOUT


class OnStandIn(VLLMBlockPool):
    name = "vllm-block-pool-stand-in"
    pool_class = fake_vllm.BlockPool


class NullBlockCounted(OnStandIn):
    """Block ids handed over as the pool's, forgetting that the pool's block 0 is the null block."""

    name = "vllm-block-pool-null-block-counted"

    def block_table(self, request):
        return [b.block_id for b in self.tables[request]]


def _contract(manager):
    pytest.importorskip("hypothesis", reason="the manager contract runs on hypothesis (pip install hypothesis)")
    from hypothesis.stateful import run_state_machine_as_test

    from conformance.manager_checks import contract

    run_state_machine_as_test(contract(manager))


def test_the_vllm_adapter_keeps_the_manager_contract_on_the_stand_in():
    _contract(OnStandIn)
    result = Runner("cpu", manager=OnStandIn).run(get_backend("sdpa"), MANAGER_ROLLOUT)
    assert result.status == Status.PASS, result.reason


def test_a_broken_vllm_translation_is_caught(record_property):
    record_property("mutant", NullBlockCounted.name)
    with pytest.raises(AssertionError, match="which is free"):  # its block 1 is the pool's block 0
        _contract(NullBlockCounted)
