"""`python -m conformance diff`: a planted regression of each kind is flagged (exit 1), a run
against itself is not, and library versions that changed are named."""
import dataclasses
import math

import pytest

from conformance.cli import main
from conformance.report import write_json
from conformance.result import Result, Status

ENV = {"torch": "2.11.0", "flashinfer": "0.7.2", "gpu": "NVIDIA H200"}


def _r(backend, status, ratio=0.3, reason=""):
    return Result(backend=backend, case="mixed_small-fp16-bs16-gqa4-d128", scenario="mixed_small", dtype="fp16",
                  block_size=16, heads="gqa4-d128", device="cuda:0", status=status, ratio=ratio, reason=reason)


LAST = [_r("a", Status.PASS), _r("b", Status.PASS), _r("c", Status.PASS), _r("d", Status.PASS, 0.2),
        _r("e", Status.FAIL, 3.0), _r("f", Status.PASS, 0.3)]


def _write(tmp_path, name, results, env=ENV):
    path = tmp_path / name
    write_json(str(path), results, {"profile": "gpu", "seed": 0, "environment": env})
    return str(path)


def test_the_same_run_has_no_regression(tmp_path, capsys):
    path = _write(tmp_path, "last.json", LAST)
    assert main(["diff", path, path]) == 0
    assert "0 regressions" in capsys.readouterr().out


@pytest.mark.parametrize("planted, kind", [
    (_r("a", Status.FAIL, 4.2, "output: max err ..."), "now failing"),
    (_r("b", Status.CRASH, None, "worker died"), "new error"),
    (_r("c", Status.SKIP, None, "kv dtype fp8 not supported"), "newly skipped"),
    (_r("d", Status.PASS, 0.61), "ratio grew"),
    (_r("g", Status.FAIL, 2.0), "now failing"),  # a new pair that fails
])
def test_each_planted_regression_is_flagged(tmp_path, capsys, planted, kind):
    tonight = [planted if r.backend == planted.backend else r for r in LAST]
    if planted.backend not in {r.backend for r in LAST}:
        tonight.append(planted)
    code = main(["diff", _write(tmp_path, "last.json", LAST), _write(tmp_path, "tonight.json", tonight)])
    out = capsys.readouterr().out
    assert code == 1 and f"## {kind}" in out and f"{planted.backend}-mixed_small" in out, out


def test_noise_and_improvements_are_no_regression(tmp_path, capsys):
    tonight = [dataclasses.replace(r, ratio=0.35) if r.backend == "f" else r for r in LAST]  # within noise
    tonight = [_r("e", Status.PASS, 0.4) if r.backend == "e" else r for r in tonight]  # fixed
    code = main(["diff", _write(tmp_path, "last.json", LAST),
                 _write(tmp_path, "tonight.json", tonight, {**ENV, "flashinfer": "0.8.0"})])
    out = capsys.readouterr().out
    assert code == 0 and "## fixed: 1" in out and "flashinfer 0.7.2 -> 0.8.0" in out, out


def test_a_report_of_before_the_call_modes_still_reads():
    """Reports written before results named their call `mode` (the field was `calls`) still read,
    so a nightly diff against an old report works; a new report names the kind and mode."""
    old = {k: v for k, v in _r("a", Status.PASS).to_dict().items() if k not in ("kind", "mode")}
    r = Result.from_dict({**old, "calls": "tokens"})
    assert (r.kind, r.mode) == ("mha", "tokens")
    assert {"kind", "mode"} <= set(r.to_dict()) and "calls" not in r.to_dict()


def test_exact_holds_every_number_of_every_pair(tmp_path, capsys):
    """`diff --exact`: a refactor's check. A number one ULP off, a pair gone and a pair new are each a
    regression; the same report, NaN numbers included, is none."""
    last = [dataclasses.replace(r, err=0.125, lse_err=math.nan) for r in LAST]
    before = _write(tmp_path, "before.json", last)
    assert main(["diff", "--exact", before, before]) == 0
    moved = [dataclasses.replace(last[0], err=math.nextafter(0.125, 1))] + last[1:-1] + [_r("g", Status.PASS)]
    assert main(["diff", "--exact", before, _write(tmp_path, "after.json", moved)]) == 1
    out = capsys.readouterr().out
    assert "3 regressions" in out and "a-mixed_small-fp16-bs16-gqa4-d128: err 0.125 -> 0.12500000000000003" in out
    assert "## new pair: 1" in out and "## gone: 1" in out
    assert main(["diff", before, _write(tmp_path, "after.json", moved)]) == 0  # below the usual diff's notice
