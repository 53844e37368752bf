"""A library's refusal at call time is a SKIP with its reason, never a pass."""
import torch

from conformance import Backend, BatchSpec, CaseSpec, HeadConfig, Runner, Status, Unsupported


class Refuses(Backend):
    name = "refuses"

    def run(self, case):
        raise Unsupported("no kernel for kv_len=1")


def test_call_time_refusal_is_a_skip_with_the_reason():
    spec = CaseSpec("t", BatchSpec([1], [1]), HeadConfig(2, 1, 8), torch.float16, 16)
    result = Runner("cpu").run(Refuses(), spec)
    assert result.status == Status.SKIP and result.reason == "refused at call time: no kernel for kv_len=1"
