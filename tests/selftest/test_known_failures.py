"""Known failures as data (conformance/known.py): a listed pair that fails is an XFAIL and no
regression; one that passes fails (strict); an expired entry fails; a bad entry is refused."""
import dataclasses
import datetime
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from conformance import KnownFailure, Runner, Status
from conformance.known import known_failure, known_outcome
from conformance.report import failing
from conformance.fixtures import CATALOG

CASE = next(c for c in CATALOG.cases("cpu") if c.scenario == "mixed_small" and c.is_plain and c.dtype.itemsize == 4)
LATER = datetime.date.today() + datetime.timedelta(days=30)
ISSUE = "https://github.com/example/kernels/issues/7"


def _adapter(bug, expires=LATER):
    import mutants

    adapter = mutants.PagedTorch(bug)
    adapter.known_failures = (KnownFailure(cases=f"{CASE.scenario}-*", reason="the scale is ignored", link=ISSUE,
                                           expires=expires.isoformat()),)
    return adapter


def test_a_listed_failure_is_expected_and_a_listed_pass_is_not():
    failed = Runner("cpu").run(_adapter("scale_ignored"), CASE)
    assert failed.status == Status.FAIL and failed.known_failure["link"] == ISSUE
    assert known_outcome(failed)[0] == "xfail" and not failing(failed)
    passed = Runner("cpu").run(_adapter(None), CASE)
    outcome, message = known_outcome(passed)
    assert outcome == "xpass" and failing(passed) and "remove the entry" in message


def test_an_expired_entry_fails_whatever_the_pair_does():
    for bug in ("scale_ignored", None):
        result = Runner("cpu").run(_adapter(bug, expires=datetime.date(2020, 1, 1)), CASE)
        outcome, message = known_outcome(result)
        assert outcome == "expired" and failing(result) and "expired on 2020-01-01" in message


def test_an_entry_for_one_compute_capability_applies_on_those_gpus_only(monkeypatch):
    """An entry of (9, 0) is an XFAIL on an sm_90 GPU, and nothing on another GPU or on the CPU."""
    adapter = _adapter("scale_ignored")
    adapter.known_failures = (dataclasses.replace(adapter.known_failures[0], compute_capability=(9, 0)),)
    on_cpu = Runner("cpu").run(adapter, CASE)
    assert on_cpu.status == Status.FAIL and on_cpu.known_failure is None and failing(on_cpu)
    gpu = torch.device("cuda")
    for capability, listed in (((9, 0), True), ((10, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cc=capability: cc)
        assert (known_failure(adapter, CASE.id, gpu) is not None) == listed, capability


@pytest.mark.parametrize("field, value, rule", [("cases", "", "non-empty glob"), ("link", "issue 7", "URL"),
                                                ("expires", "next spring", "YYYY-MM-DD"), ("reason", "", "why"),
                                                ("compute_capability", "sm_90", "pair of ints"),
                                                ("compute_capability", (9,), "pair of ints")])
def test_an_entry_names_its_bad_field(field, value, rule):
    entry = dict(cases="*", reason="r", link=ISSUE, expires="2030-01-01")
    with pytest.raises(ValueError, match=f"KnownFailure.{field} = .*{rule}"):
        KnownFailure(**{**entry, field: value})


def test_pytest_reports_xfail_and_strict_xpass(tmp_path):
    """Through the plugin: the listed failing pair is an XFAIL, the listed passing one a FAIL."""
    (tmp_path / "known_adapters.py").write_text(textwrap.dedent(f"""
        import datetime, sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        import mutants
        from conformance import KnownFailure, register_backend

        for name, bug in (("listed-broken", "scale_ignored"), ("listed-correct", None)):
            adapter = mutants.PagedTorch(bug)
            adapter.name = name
            adapter.known_failures = (KnownFailure("{CASE.scenario}-*", "the scale is ignored", "{ISSUE}",
                                                   "{LATER.isoformat()}"),)
            register_backend(adapter)
    """))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backend.py",
                          "--attn-load", "known_adapters", "--attn-backend", "listed-broken,listed-correct",
                          "-k", CASE.id, "-rxf"],
                         capture_output=True, text=True,  # on the CPU, where the torch mutants run
                         env={**os.environ, "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}).stdout
    failed, xfailed = (re.search(rf"(\d+) {word}", out) for word in ("failed", "xfailed"))
    assert failed and xfailed and failed[1] == xfailed[1], out  # each case: listed-broken XFAIL, listed-correct FAIL
    assert "FAILED tests/test_backend.py::test_backend[listed-broken" not in out
    assert "is listed as a known failure but passes" in out, out
