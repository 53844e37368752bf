"""The main job end to end: run -> table + JSON -> merged Markdown report."""
from conformance.cli import main
from conformance.report import read_json


def test_run_writes_a_report_that_report_turns_into_a_table(tmp_path, capsys):
    path = str(tmp_path / "r.json")
    assert main(["run", "--backend", "sdpa", "--scenario", "small_decode", "--json", path]) == 0
    out = capsys.readouterr().out
    assert "small_decode" in out and "PASS 60  SKIP 36" in out and "feature softcap not supported (12 cases)" in out
    meta, results = read_json(path)
    assert meta["environment"]["torch"] and meta["environment"]["reference_dtype"] == "float64"
    assert len(results) == 96 and {r.backend for r in results} == {"sdpa"}
    assert main(["report", path]) == 0
    md = capsys.readouterr().out
    assert "| scenario | sdpa |" in md and "| small_decode | 60/60 r" in md


def test_unknown_backend_is_named_and_exits_2(capsys):
    assert main(["run", "--backend", "nope", "--json", ""]) == 2
    assert "--backend ['nope']: not registered" in capsys.readouterr().err


def test_report_merges_reruns_and_writes_one_json(tmp_path, capsys):
    first, again, merged = (str(tmp_path / n) for n in ("a.json", "b.json", "m.json"))
    assert main(["run", "--backend", "sdpa", "--scenario", "small_decode", "--json", first]) == 0
    assert main(["run", "--backend", "sdpa", "--scenario", "small_decode,mixed_small", "--json", again]) == 0
    capsys.readouterr()
    assert main(["report", first, again, "--json", merged]) == 0
    md = capsys.readouterr().out
    meta, results = read_json(merged)
    assert len(results) == len({r.id for r in results}) == len(read_json(again)[1])  # the rerun replaced
    assert meta["merged_from"] == ["a.json", "b.json"] and "`a.json`, `b.json`: profile cpu" in md
