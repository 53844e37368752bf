"""The console's skips: grouped by cause (report.skip_cause), one line each with its counts and fix;
every reason with verbose; a reason no pattern knows kept under its own text; a bounded line count."""
from conformance import Result, Status
from conformance.report import MAX_SKIP_CAUSES, skip_cause, skip_summary, summarize


def skip(backend: str, reason: str, case: str = "c") -> Result:
    return Result(backend=backend, case=case, scenario="s", dtype="fp16", block_size=16, heads="h", device="cpu",
                  status=Status.SKIP, reason=reason)


# Reasons as registry.py, backends/*.py and the call modes word them.
RESULTS = [
    *(skip(b, "flashinfer is not installed", c) for b in ("fi-a", "fi-b", "fi-c") for c in ("c1", "c2")),
    skip("fi-a", "the captured batch: flashinfer is not installed", "c3"),
    skip("fa2", "flash_attn is not importable (ModuleNotFoundError: No module named 'flash_attn')"),
    skip("fa4", "call 1 of 2 (chunks): flash_attn.cute is not importable (ModuleNotFoundError: No module named "
                "'flash_attn')"),
    skip("mla", "flash_mla is not installed"),
    skip("vfa", "vllm.vllm_flash_attn is not importable (ModuleNotFoundError: No module named 'vllm')"),
    skip("cu", "device cpu not supported (supports: cuda); feature sinks not supported", "c1"),
    skip("cu", "device cpu not supported (supports: cuda)", "c2"),
    skip("h", "compute capability sm_80 outside sm_90..sm_90"),
    skip("b", "compute capability sm_80 outside sm_90..sm_100"),
    skip("sd", "feature sinks not supported", "c1"),
    skip("sd", "kv dtype fp8_e4m3 not supported (supports: auto)", "c2"),
    skip("split", "split-KV is the decode path: batches with prefill tokens take the one-pass kernel", "c1"),
    skip("split", "the rollout's prompt call 1: split-KV is the decode path: batches with prefill tokens take the "
                  "one-pass kernel", "c2"),
]


def test_causes_and_fixes():
    assert skip_cause("the captured batch: flashinfer is not installed") == \
        ("flashinfer not installed", 'pip install -e ".[flashinfer]"')
    assert skip_cause(RESULTS[8].reason) == ("flash_attn.cute not installed", "pip install flash-attn-4")
    assert skip_cause(RESULTS[9].reason)[1].startswith("FlashMLA has no PyPI release")
    assert skip_cause(RESULTS[10].reason) == ("vllm.vllm_flash_attn not installed", "pip install vllm")
    # The device is what to fix first, not the feature named after it.
    assert skip_cause(RESULTS[11].reason) == ("device cpu not supported", "needs CUDA")
    assert skip_cause(RESULTS[13].reason) == ("compute capability sm_80", "needs sm_90")
    assert skip_cause(RESULTS[14].reason) == ("compute capability sm_80", "needs sm_90..sm_100")
    assert skip_cause(RESULTS[16].reason) == ("kv dtype fp8_e4m3 not supported", None)
    # A broken build is not "not installed": its own text.
    broken = "flash_attn is not importable (ImportError: undefined symbol: _ZN3c10)"
    assert skip_cause(broken) == (broken, None)


def test_one_line_per_cause_with_counts():
    text = skip_summary(RESULTS)
    lines = text.splitlines()
    assert lines[0] == f"skipped {len(RESULTS)} by cause (-v: every reason):"
    assert lines[1] == '  flashinfer not installed: 3 backends, 3 cases -> pip install -e ".[flashinfer]"'
    assert '  flash_attn not installed: fa2, 1 case -> pip install -e ".[flash-attn]"' in lines
    assert "  device cpu not supported: cu, 2 cases -> needs CUDA" in lines
    assert "  feature sinks not supported: sd, 1 case" in lines
    assert sum("flashinfer" in line for line in lines) == 1
    assert "skip reasons:" not in text


def test_unknown_reasons_are_kept_under_their_own_text():
    lines = skip_summary(RESULTS).splitlines()
    # Both calls' reasons are one cause: the call named in front is left out.
    assert "  split-KV is the decode path: batches with prefill tokens take the one-pass kernel: split, 2 cases" \
        in lines


def test_verbose_lists_every_reason():
    text = skip_summary(RESULTS, verbose=True)
    assert text.startswith(f"skipped {len(RESULTS)} by cause:")
    every = text.split("skip reasons:\n")[1]
    assert all(f"  {r.backend}: {r.reason} (" in every for r in RESULTS)
    assert "  fi-b: flashinfer is not installed (2 cases)" in text
    assert summarize(RESULTS, verbose=True).endswith(text) and not summarize(RESULTS).endswith(text)


def test_many_causes_stay_a_few_lines_and_are_counted():
    many = [skip("b", f"an adapter's own rule number {i}", f"c{i}") for i in range(40)]
    lines = skip_summary(many).splitlines()
    assert len(lines) == MAX_SKIP_CAUSES + 1 <= 16
    assert lines[-1] == f"  ... {40 - MAX_SKIP_CAUSES + 1} more causes, {40 - MAX_SKIP_CAUSES + 1} skips (-v lists them)"
    assert len(skip_summary(many, verbose=True).splitlines()) == 1 + 40 + 1 + 40
    assert skip_summary([]) == ""
