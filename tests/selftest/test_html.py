"""`report --html --heatmap`: the HTML report holds every pair and, for each failure, a command
that reruns it (and does); the heatmap is written."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.cli import main

SELFTEST = Path(__file__).parent


def test_html_report_reruns_each_failure_and_heatmap(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the heatmap needs matplotlib (the plots extra)")
    report, page, png = (str(tmp_path / n) for n in ("r.json", "r.html", "h.png"))
    # A run with failures: the suite's broken adapter that ignores the scale, beside sdpa.
    (tmp_path / "mutant_adapters.py").write_text("import mutants\nfrom conformance import register_backend\n"
                                                 "register_backend(mutants.PagedTorch('scale_ignored'))\n")
    # On the CPU, where the torch mutants run.
    cpu = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{SELFTEST}", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "conformance", "run", "--load", "mutant_adapters", "--backend",
                          "sdpa,mutant-scale-ignored", "--scenario", "small_decode", "--profile", "cpu", "--json",
                          report], capture_output=True, text=True, env=cpu)
    assert run.returncode == 1, run.stderr[-2000:]
    assert main(["report", report, "--html", page, "--heatmap", png]) == 1
    capsys.readouterr()
    rows = json.loads(re.search(r"const ROWS = (\[.*?\]);\n", Path(page).read_text()).group(1).replace("<\\/", "</"))
    failing = [row for row in rows if row[3] == "FAIL"]
    assert rows and failing and all(row[6].startswith("python -m pytest ") for row in failing)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rerun = subprocess.run([sys.executable, *shlex.split(failing[0][6])[1:], "--attn-load", "mutant_adapters", "-q",
                            "-p", "no:cacheprovider"], capture_output=True, text=True,
                           env=cpu)
    assert "1 failed" in rerun.stdout, rerun.stdout[-2000:]


def test_the_rerun_command_names_the_test_of_the_pairs_kind():
    from conformance.html import reproduce
    from conformance.result import Result, Status

    def result(kind, heads):
        return Result(backend="b", case=f"small_decode-fp16-bs16-{heads}", scenario="small_decode", dtype="fp16",
                      block_size=16, heads=heads, device="cpu", status=Status.FAIL, kind=kind)

    assert reproduce(result("mla", "h16"), "cpu", 0).startswith(
        'python -m pytest "tests/test_mla_backend.py::test_mla_backend[b-small_decode-fp16-bs16-h16]" ')
    assert reproduce(result("mha", "gqa4-d128"), "cpu", 0).startswith(
        'python -m pytest "tests/test_backend.py::test_backend[b-small_decode-fp16-bs16-gqa4-d128]" ')
