"""probe (--attn-probe, run --probe): a case a backend declares unsupported runs anyway as probe-<backend>; a library that
accepts it and computes it right passes, one that accepts it and gets it wrong fails (the bug class
probes exist for), one that refuses it is a skip."""
import dataclasses

import torch

import mutants
import pytest

from conformance import Runner, Status, Unsupported
from conformance.probe import probes
from conformance.report import failing, summarize
from conformance.fixtures import CATALOG
from conformance.fixtures.pytest_plugin import check

CPU = torch.device("cpu")
CASES = [c for c in CATALOG.cases("cpu") if c.scenario == "mixed_small" and c.softcap is not None
         and c.dtype.itemsize == 4]


def _no_softcap(adapter):
    """The adapter declaring softcap unsupported (whatever its kernel does with it)."""
    adapter.capabilities = dataclasses.replace(adapter.capabilities,
                                               features=adapter.capabilities.features - {"softcap"})
    return adapter


class Refuses(mutants.PagedTorch):
    def run(self, case):
        if case.spec.softcap is not None:
            raise Unsupported("softcap: no kernel")
        return super().run(case)


@pytest.mark.parametrize("adapter, status, fails", [
    (mutants.PagedTorch(), Status.PASS, False),  # the declaration is stricter than the kernel
    (mutants.PagedTorch("softcap_ignored"), Status.FAIL, True),  # accepted without a word, wrong
    (Refuses(), Status.SKIP, False),  # refused at call time, as declared
])
def test_a_probe_tells_what_the_library_does_with_a_declared_refusal(adapter, status, fails):
    adapter = _no_softcap(adapter)
    assert CASES and all("softcap" in adapter.skip_reason(c, CPU) for c in CASES)
    pairs = probes([(adapter, c) for c in CASES], CPU)
    assert len(pairs) == len(CASES) and pairs[0][0].name == f"probe-{adapter.name}"
    results = [Runner("cpu").run(probe, spec) for probe, spec in pairs]
    assert {r.status for r in results} == {status}
    assert all("feature softcap not supported" in r.probe for r in results)
    assert any(failing(r) for r in results) == fails
    result = results[0]
    if fails:
        with pytest.raises(pytest.fail.Exception, match="declared unsupported .* got it wrong"):
            check(result)
        assert "accepted, silently wrong" in summarize(results)


def test_a_probe_leaves_alone_what_is_declared_supported_or_cannot_run_here():
    adapter = _no_softcap(mutants.PagedTorch())
    plain = next(c for c in CATALOG.cases("cpu") if c.scenario == "mixed_small" and c.is_plain)
    assert not probes([(adapter, plain)], CPU)  # declared supported: the backend runs it itself
    cuda_only = dataclasses.replace(adapter.capabilities, devices=frozenset({"cuda"}))
    adapter.capabilities = cuda_only
    assert not probes([(adapter, c) for c in CASES], CPU)  # its device is not here
