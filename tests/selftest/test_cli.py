"""The main job end to end: run -> table + JSON -> merged Markdown report."""
from conformance.cli import main
from conformance.matrix import default_profile
from conformance.report import read_json


def test_run_writes_a_report_that_report_turns_into_a_table(tmp_path, capsys):
    path = str(tmp_path / "r.json")
    assert main(["run", "--profile", "cpu", "--backend", "sdpa", "--scenario", "small_decode", "--json", path]) == 0
    out = capsys.readouterr().out
    assert "small_decode" in out and "PASS 66  SKIP 36" in out and "  feature softcap not supported: sdpa, 12 cases" in out
    meta, results = read_json(path)
    assert meta["environment"]["torch"] and meta["environment"]["reference_dtype"] == "float64"
    assert len(results) == 102 and {r.backend for r in results} == {"sdpa"}
    assert main(["report", path]) == 0
    md = capsys.readouterr().out
    assert "| scenario | sdpa |" in md and "| small_decode | 66/66 r" in md
    assert "### Cost" in md and "| sdpa | " in md and " | 66 |" in md  # seconds of the 66 pairs that ran


def test_unknown_backend_is_named_and_exits_2(capsys):
    assert main(["run", "--backend", "nope", "--json", ""]) == 2
    assert "backend = ['nope']: not registered" in capsys.readouterr().err


def test_report_merges_reruns_and_writes_one_json(tmp_path, capsys):
    first, again, merged = (str(tmp_path / n) for n in ("a.json", "b.json", "m.json"))
    assert main(["run", "--backend", "sdpa", "--scenario", "small_decode", "--json", first]) == 0
    assert main(["run", "--backend", "sdpa", "--scenario", "small_decode,mixed_small", "--json", again]) == 0
    capsys.readouterr()
    assert main(["report", first, again, "--json", merged]) == 0
    md = capsys.readouterr().out
    meta, results = read_json(merged)
    assert len(results) == len({r.id for r in results}) == len(read_json(again)[1])  # the rerun replaced
    assert meta["merged_from"] == ["a.json", "b.json"]
    assert f"`a.json`, `b.json`: profile {default_profile(main_job=True)}" in md


def test_report_writes_its_json_even_when_the_reader_stops_early(tmp_path, monkeypatch):
    """`report ... --json m.json | head`: the pipe closes before the table is printed."""
    import builtins

    report, merged = str(tmp_path / "a.json"), tmp_path / "m.json"
    assert main(["run", "--backend", "sdpa", "--scenario", "small_decode", "--json", report]) == 0

    def closed_pipe(*args, **kwargs):
        raise BrokenPipeError

    monkeypatch.setattr(builtins, "print", closed_pipe)
    try:
        main(["report", report, "--json", str(merged)])
    except BrokenPipeError:
        pass
    assert len(read_json(str(merged))[1]) == len(read_json(report)[1])


def test_flake_check_runs_every_seed_and_isolated_runs_match(tmp_path, capsys):
    args = ["--backend", "sdpa", "--scenario", "small_decode", "--profile", "cpu"]
    assert main(["flake-check", *args, "--seeds", "2", "--seed", "5", "--json", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    assert "x 2 base seeds (5..6)" in out and "no pair failed on any seed" in out
    assert main(["report", "--flakes", *(str(tmp_path / f"f.seed{s}.json") for s in (5, 6))]) == 0
    assert "base seeds [5, 6]" in capsys.readouterr().out
    seeds = [read_json(str(tmp_path / f"f.seed{s}.json")) for s in (5, 6)]
    assert [meta["seed"] for meta, _ in seeds] == [5, 6]
    assert seeds[0][1][0].seed != seeds[1][1][0].seed  # other data on each seed
    # The same run isolated in a worker process gives the same numbers.
    assert main(["run", *args, "--seed", "5", "--isolate", "on", "--json", str(tmp_path / "iso.json")]) == 0
    fields = ("id", "status", "err", "ref_err", "tol")
    assert [[getattr(r, f) for f in fields] for r in read_json(str(tmp_path / "iso.json"))[1]] == \
        [[getattr(r, f) for f in fields] for r in seeds[0][1]]


def test_flake_summary_names_pairs_that_fail_on_some_seeds_only():
    from conformance import Result, Status
    from conformance.report import flake_summary

    def result(case, status, ratio):
        return Result(backend="b", case=case, scenario="s", dtype="fp16", block_size=16, heads="h", device="cpu",
                      status=status, ratio=ratio, reason="output: max err" if status == Status.FAIL else "")

    by_seed = {0: [result("steady", Status.PASS, 0.2), result("flaky", Status.PASS, 0.9), result("bad", Status.FAIL, 3)],
               1: [result("steady", Status.PASS, 0.3), result("flaky", Status.FAIL, 1.1), result("bad", Status.FAIL, 2)]}
    text, clean = flake_summary(by_seed)
    assert not clean
    assert "flaky b-flaky: FAIL on seeds [1] of 2: output: max err" in text
    assert "always failing b-bad: FAIL on seeds [0, 1] of 2" in text
    row = next(line for line in text.splitlines() if line.startswith("b "))
    assert row.split()[1:5] == ["3", "2", "1", "1"] and "3.00 (0, bad)" in row


def test_console_table_names_backends_that_ran_nothing_below_it():
    from conformance import Result, Status
    from conformance.report import format_table

    def result(backend, status):
        return Result(backend=backend, case="c", scenario="s", dtype="fp16", block_size=16, heads="h", device="cpu",
                      status=status, ratio=0.5 if status == Status.PASS else None)

    results = [result("ran", Status.PASS), result("ran", Status.SKIP), result("absent", Status.SKIP)]
    text = format_table(results)
    assert "absent" not in text.splitlines()[0] and text.endswith("nothing run here (every case skipped): absent")
    assert "| scenario | ran | absent |" in format_table(results, markdown=True)


def test_cases_in_many_calls_have_their_own_table():
    from conformance import Result, Status
    from conformance.report import format_table

    def result(calls, ulp=None, deterministic=None):
        return Result(backend="b", case=f"c-{calls}", scenario="s", dtype="fp16", block_size=16, heads="h",
                      device="cpu", status=Status.PASS, ratio=0.5, mode=calls, calls_ulp=ulp,
                      deterministic=deterministic)

    text = format_table([result("one"), result("tokens", 3), result("invariance", 0, False)])
    main, legend, calls = text.split("\n\n")
    assert [line.split()[0] for line in main.splitlines()[2:]] == ["s"]
    assert legend.startswith("Many calls on one cache: ")
    assert "s tokens      1/1 r0.50 u3" in calls and "s invariance  1/1 r0.50 u0 nd1" in calls
    assert "### Many calls on one cache" in format_table([result("tokens", 3)], markdown=True)
