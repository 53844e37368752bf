"""Turning Results into what people read: the console table, the JSON report, the environment."""
from __future__ import annotations

import json
import lzma
import platform
import re
import statistics
import sys
from collections import Counter, defaultdict
from importlib.metadata import PackageNotFoundError, version

import torch

from .known import expected, known_outcome
from .result import Result, Status
from .spec import ONE_CALL

# Libraries of the built-in backends, by their distribution names (what records a version).
LIBRARIES = {"triton": "triton", "flashinfer": "flashinfer-python", "flash_attn": "flash-attn",
             "flash_attn_3": "flash_attn_3", "flash_attn_4": "flash-attn-4",
             # FlashInfer's prebuilt kernels, used only at exactly flashinfer-python's version:
             "flashinfer_jit_cache": "flashinfer-jit-cache", "flashinfer_cubin": "flashinfer-cubin"}
GiB = 1 << 30
REPORT_SCHEMA = "attention-conformance/report/v1"
BAD = (Status.FAIL, Status.ERROR, Status.CRASH, Status.TIMEOUT)


def environment(device: torch.device) -> dict:
    """Versions that decide what a result means: recorded in every report."""
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "device": str(device), "reference_dtype": "float64"}
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(device),
                   compute_capability="sm_%d%d" % torch.cuda.get_device_capability(device))
    for name, distribution in LIBRARIES.items():
        try:
            env[name] = version(distribution)
        except PackageNotFoundError:
            env[name] = None
    return env


def failing(r: Result) -> bool:
    """Whether a result fails its run: a bad status that is no (unexpired) known failure, or a known
    failure that passes or has expired (known.py)."""
    if r.probe:  # run though declared unsupported: only a silently wrong answer is a failure
        return r.status == Status.FAIL
    known = known_outcome(r)
    return known[0] != "xfail" if known else r.status in BAD


def write_json(path: str, results: list[Result], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"schema": REPORT_SCHEMA, **meta, "results": [r.to_dict() for r in results]}, f, indent=1)


def _cell(rs: list[Result]) -> str:
    ran = [r for r in rs if r.status != Status.SKIP]
    if not ran:
        return "skip"
    passed = sum(r.status == Status.PASS for r in ran)
    xfailed = sum(expected(r) for r in ran)
    ratios = [r.ratio for r in ran if r.ratio is not None]
    text = f"{passed}/{len(ran)}"
    if ratios:
        text += f" r{max(ratios):.2f}"
    ulps = [r.calls_ulp for r in ran if r.calls_ulp is not None]
    if ulps:
        text += f" u{max(ulps)}"
    unsteady = sum(r.deterministic is False for r in ran)
    if unsteady:
        text += f" nd{unsteady}"
    if xfailed:
        text += f" xf{xfailed}"
    if passed + xfailed < len(ran):
        text = "FAIL " + text
    skipped = len(rs) - len(ran)
    return text + (f" s{skipped}" if skipped else "")


def read_json(path: str) -> tuple[dict, list[Result]]:
    """A report written by write_json (optionally xz-compressed): its metadata and its Results."""
    with (lzma.open(path, "rt") if path.endswith(".xz") else open(path)) as f:
        data = json.load(f)
    if data.get("schema") != REPORT_SCHEMA:
        raise ValueError(f"{path}: schema = {data.get('schema')!r}, expected {REPORT_SCHEMA!r}")
    results = [Result.from_dict(r) for r in data.pop("results")]
    return data, results


CALLS_LEGEND = ("a row's cases in chunks or token by token, in other batches and again, as a rollout, or "
                "captured in a CUDA graph and replayed on other batches; u = the largest "
                "difference from one call over the whole batch, in ULPs at the output's scale; nd = cases whose "
                "same call, made twice, gave other bits.")


def format_table(results: list[Result], markdown: bool = False) -> str:
    """Scenario x backend: passed/run, worst err/tol ratio (r), skipped count (s); below it, the
    cases in many calls (their rows read "scenario calls"). The console table leaves out backends
    that ran nothing (named below it; the skip reasons say why); the Markdown support table keeps
    them, as columns of "skip"."""
    backends = list(dict.fromkeys(r.backend for r in results))
    idle = [] if markdown else [b for b in backends if all(r.status == Status.SKIP for r in results if r.backend == b)]
    backends = [b for b in backends if b not in idle]
    by = defaultdict(list)
    for r in results:
        by[r.scenario if r.mode == ONE_CALL else f"{r.scenario} {r.mode}", r.backend].append(r)
    rows = list(dict.fromkeys(row for row, _ in by))
    one = [[s, *(_cell(by[s, b]) for b in backends)] for s in rows if " " not in s]
    calls = [[s, *(_cell(by[s, b]) for b in backends)] for s in rows if " " in s]
    texts = [_markdown_table(t) if markdown else _text_table(t) for t in ([["scenario", *backends]] + one,) if one]
    if calls:
        texts.append(f"### Many calls on one cache\n\n{CALLS_LEGEND[0].upper()}{CALLS_LEGEND[1:]}" if markdown
                     else f"Many calls on one cache: {CALLS_LEGEND}")
        texts.append((_markdown_table if markdown else _text_table)([["many calls", *backends]] + calls))
    return "\n\n".join(texts) + (f"\nnothing run here (every case skipped): {', '.join(idle)}" if idle else "")


def _markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + " --- |" * len(rows[0]))
    return "\n".join(lines)


def _text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_cost(results: list[Result]) -> str:
    """Markdown: where the time went (each phase of costs.py over the pairs run: in all, and the
    median pair), the 20 longest pairs by wall, the memory estimates against the measured peaks
    (CUDA), and the seconds each backend and each scenario cost (the backend's and the harness's time
    of every pair run, summed over a run's processes: the device time a tier takes), largest first."""
    ran = [r for r in results if r.status != Status.SKIP and r.backend_seconds is not None]
    lines = ["| phase | seconds in all | median pair, ms |", "| --- | --- | --- |"]
    for name, what in PHASE_NAMES.items():
        seconds = [getattr(r, f"{name}_seconds") or 0.0 for r in ran]
        if seconds:
            lines.append(f"| {what} | {sum(seconds):.1f} | {1000 * statistics.median(seconds):.1f} |")
    lines += ["", f"The {min(20, len(ran))} longest pairs by wall (seconds):", "",
              "| pair | wall | " + " | ".join(PHASE_NAMES) + " |", "| --- |" + " --- |" * (len(PHASE_NAMES) + 1)]
    for r in sorted(ran, key=lambda r: -r.wall)[:20]:
        lines.append(f"| {r.id} | {r.wall:.1f} | "
                     + " | ".join(f"{getattr(r, f'{name}_seconds') or 0:.1f}" for name in PHASE_NAMES) + " |")
    lines += ["", memory_accuracy(ran), ""]
    for what in ("backend", "scenario"):
        seconds, pairs = Counter(), Counter()
        for r in ran:
            seconds[getattr(r, what)] += r.seconds
            pairs[getattr(r, what)] += 1
        lines += [f"| {what} | seconds | pairs run |", "| --- | --- | --- |"]
        lines += [f"| {name} | {s:.1f} | {pairs[name]} |" for name, s in seconds.most_common()] + [""]
    return "\n".join(lines)


# The phases of a pair's time (costs.py), as the Result's `<name>_seconds` fields hold them.
PHASE_NAMES = {"wait": "waiting for GPU memory", "inputs": "inputs and fresh caches", "reference": "references",
               "backend": "backend calls", "compile": "... of which compiling", "judge": "judging"}


def memory_accuracy(results: list[Result]) -> str:
    """How close the memory estimates (what a case is admitted with) came to the measured peaks, over
    the pairs that took more than the idle claim: the ratio estimate / peak, whose median sets how
    many big cases share the GPU at once."""
    pairs = [r for r in results if r.memory_peak and r.memory_estimate and r.memory_peak > GiB]
    if not pairs:
        return "Memory estimates: no pair measured over 1 GiB (CUDA only)."
    ratios = sorted(r.memory_estimate / r.memory_peak for r in pairs)
    q = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios * 9
    under = [r for r in pairs if r.memory_estimate < r.memory_peak]
    text = (f"Memory estimate / measured peak over {len(pairs)} pairs that peaked over 1 GiB: median "
            f"{statistics.median(ratios):.2f}, 10th-90th percentile {q[0]:.2f}-{q[-1]:.2f}, least {ratios[0]:.2f}, "
            f"most {ratios[-1]:.2f}; {len(under)} under their peak")
    worst = min(under, key=lambda r: r.memory_estimate / r.memory_peak, default=None)
    return text + (f" (the least: {worst.id}, {worst.memory_estimate / GiB:.1f} GiB for a peak of "
                   f"{worst.memory_peak / GiB:.1f} GiB)." if worst else ".")


def summarize(results: list[Result], verbose: bool = False) -> str:
    """The run in a few lines: counts, probes, what went wrong, the bad results, the skips by
    cause (verbose: every skip reason too)."""
    counts = Counter(r.status for r in results)
    lines = ["  ".join(f"{s.value} {counts[s]}" for s in Status if counts[s])]
    probed = Counter(("accepted and right" if r.status == Status.PASS else "accepted, silently wrong"
                      if r.status == Status.FAIL else "refused")
                     for r in results if r.probe and r.status != Status.SKIP)
    if probed:
        lines.append("probes (declared unsupported, run anyway): " + ", ".join(f"{k} {n}" for k, n in probed.items()))
    declared = Counter(r.backend for r in results if r.noise == "tf32" and r.status != Status.SKIP)
    if declared:
        lines.append("fp32 judged against TF32's noise, as declared (Capabilities.fp32_precision): "
                     + ", ".join(f"{b} {n} pairs" for b, n in declared.items()))
    categories = Counter(c.value for r in results for c in r.categories)
    if categories:
        lines.append("what went wrong: " + ", ".join(f"{c} {n}" for c, n in categories.most_common()))
    ran = [r for r in results if r.harness_seconds is not None]
    if ran:
        def ms(name: str) -> str:
            return f"{1000 * statistics.median(getattr(r, f'{name}_seconds') or 0.0 for r in ran):.1f}"
        lines.append(f"time: {len(ran)} pairs run; the median pair's harness {ms('harness')} ms (inputs {ms('inputs')}, "
                     f"references {ms('reference')}, judging {ms('judge')}), backend {ms('backend')} ms; in all "
                     f"harness {sum(r.harness_seconds for r in ran):.1f}s, backends "
                     f"{sum(r.backend_seconds or 0 for r in ran):.1f}s (compiling "
                     f"{sum(r.compile_seconds or 0 for r in ran):.1f}s), waiting for memory "
                     f"{sum(r.wait_seconds or 0 for r in ran):.1f}s")
    # Bad results grouped by backend, status and the first line of the reason, one example each.
    bad = defaultdict(list)
    for r in results:
        known = known_outcome(r)
        if known or r.status in BAD:
            status = known[0].upper() if known else ("PROBE " if r.probe else "") + r.status.value
            what = f"{status} [{', '.join(c.value for c in r.categories)}]"
            bad[(r.backend, what, r.reason.splitlines()[0] if r.reason else "")].append(r.id)
    for (backend, what, reason), ids in list(bad.items())[:30]:
        lines.append(f"  {what} {ids[0]}{f' (and {len(ids) - 1} more of {backend})' if len(ids) > 1 else ''}: {reason}")
    if len(bad) > 30:
        lines.append(f"  ... and {len(bad) - 30} more kinds (see the JSON report)")
    skips = skip_summary(results, verbose)
    return "\n".join(lines + ([skips] if skips else []))


# The fix for a missing library, by the module its adapter imports (a dotted name, else its top
# level): pyproject.toml's extra where there is one.
LIBRARY_FIXES = {
    "flashinfer": 'pip install -e ".[flashinfer]"',
    "flash_attn": 'pip install -e ".[flash-attn]"',
    "flash_attn.cute": "pip install flash-attn-4",
    "flash_attn_interface": "FlashAttention-3 has no package: build hopper/ of github.com/Dao-AILab/flash-attention",
    "flash_mla": "FlashMLA has no PyPI release: build github.com/deepseek-ai/FlashMLA",
    "triton": 'pip install -e ".[triton]"',
    "numpy": 'pip install -e ".[triton]"',  # Triton's interpreter needs it (triton_rules.no_triton_here)
    "vllm": "pip install vllm",
}


def _library_fix(m: re.Match) -> str | None:
    module = m["module"]
    return LIBRARY_FIXES.get(module) or LIBRARY_FIXES.get(module.split(".")[0])


def _cc_fix(m: re.Match) -> str:
    return f"needs {m['lo']}" if m["lo"] == m["hi"] else f"needs {m['lo']}..{m['hi']}"


# What a skip reason means, from its wording (registry.Capabilities.unsupported, Backend.unavailable
# and the adapters' in backends/, triton_rules.py): (pattern, cause, fix or a function of the match).
# A reason joins rules with "; ", behind "<which call>: " for a call of many: the first pattern that
# matches one of its rules wins, so the order says what to fix first (the library, then the device).
# A ModuleNotFoundError only: a build that is there and fails to import is no "not installed".
_RULE = r"(?:^|[:;] )"
SKIP_CAUSES = (
    (_RULE + r"(?P<module>[\w.]+) is not (?:installed|importable \(ModuleNotFoundError)", "{module} not installed",
     _library_fix),
    (_RULE + r"torch\.nn\.attention\.flex_attention not importable", "torch without FlexAttention", "needs torch>=2.5"),
    (_RULE + r"(?:no CUDA and TRITON_INTERPRET|CPU tensors need Triton's interpreter)", "Triton's interpreter is off",
     "TRITON_INTERPRET=1, or CUDA"),
    (_RULE + r"device (?P<device>\w+) not supported \(supports: cuda\)", "device {device} not supported", "needs CUDA"),
    (_RULE + r"device (?P<device>\w+) not supported", "device {device} not supported", None),
    (_RULE + r"compute capability (?P<cc>sm_\d+) outside (?P<lo>sm_\d+)\.\.(?P<hi>sm_\d+)", "compute capability {cc}",
     _cc_fix),
    (_RULE + r"bf16 under Triton's interpreter", "bf16 under Triton's interpreter (wrong bits)", "covered on CUDA"),
    (_RULE + r"under Triton's interpreter", "big batches and variants run plain only under Triton's interpreter",
     "covered on CUDA"),
    (_RULE + r"no CUDA-graph replay", "no CUDA-graph replay (Capabilities.cuda_graphs)", None),
    # The declared rules: "feature sinks not supported (supports: ...)" -> "feature sinks not supported".
    (_RULE + r"(?P<rule>[^;:]*?) not supported\b", "{rule} not supported", None),
)
_CALL_PREFIX = re.compile(r"^(?:call \d+ of \d+ \(\w+\)|the captured batch|the \w+ replay|the rollout's \w+ call \d+): ")
MAX_SKIP_CAUSES = 14  # console lines of causes; past it the rest is counted on one line (-v lists them)


def skip_cause(reason: str) -> tuple[str, str | None]:
    """(cause, fix or None) of a skip reason; a reason no pattern knows is its own cause (without
    the call it names: every call of a case meets the same rule)."""
    for pattern, cause, fix in SKIP_CAUSES:
        m = re.search(pattern, reason)
        if m:
            return cause.format(**m.groupdict()), fix(m) if callable(fix) else fix
    return _CALL_PREFIX.sub("", reason), None


def skip_summary(results: list[Result], verbose: bool = False) -> str:
    """The skips grouped by cause, one line each (backends, cases, the fix), most skips first; with
    verbose, every cause and then every backend's every reason ("" without skips)."""
    skipped = [r for r in results if r.status == Status.SKIP]
    if not skipped:
        return ""
    groups = defaultdict(list)
    for r in skipped:
        groups[skip_cause(r.reason)].append(r)
    ordered = sorted(groups.items(), key=lambda g: -len(g[1]))
    shown = ordered if verbose or len(ordered) <= MAX_SKIP_CAUSES else ordered[:MAX_SKIP_CAUSES - 1]
    lines = []
    for (cause, fix), rs in shown:
        backends = sorted({r.backend for r in rs})
        who = ", ".join(backends) if len(backends) <= 2 else f"{len(backends)} backends"
        cases = len({r.case for r in rs})
        lines.append(f"  {cause}: {who}, {cases} case{'s' * (cases != 1)}" + (f" -> {fix}" if fix else ""))
    rest = ordered[len(shown):]
    if rest:
        lines.append(f"  ... {len(rest)} more causes, {sum(len(rs) for _, rs in rest)} skips (-v lists them)")
    lines.insert(0, f"skipped {len(skipped)} by cause" + ("" if verbose else " (-v: every reason)") + ":")
    if verbose:
        reasons = Counter((r.backend, r.reason) for r in skipped)
        lines.append("skip reasons:")
        lines += [f"  {b}: {reason} ({n} cases)" for (b, reason), n in sorted(reasons.items())]
    return "\n".join(lines)


def flake_summary(by_seed: dict[int, list[Result]]) -> tuple[str, bool]:
    """The same backend x case pairs run over several base seeds: per backend, how many pairs ran,
    how many fail on every seed, how many are flaky (pass on one seed, fail on another), and the
    pair that came closest to its tolerance. Returns the text and whether every pair passed."""
    # backend -> pair -> seed -> result; the pairs each backend ran (skips are not runs)
    runs: dict[str, dict[str, dict[int, Result]]] = defaultdict(lambda: defaultdict(dict))
    for seed, results in by_seed.items():
        for r in results:
            if r.status != Status.SKIP:
                runs[r.backend][r.id][seed] = r
    rows = [["backend", "pairs", "seeds", "always failing", "flaky", "worst err/tol (seed, case)"]]
    found = {"flaky": [], "always failing": []}
    for backend, pairs in runs.items():
        counts = Counter()
        for pid, by in pairs.items():
            bad = sorted(s for s, r in by.items() if r.status in BAD)
            if bad:
                kind = "always failing" if len(bad) == len(by) else "flaky"
                counts[kind] += 1
                found[kind].append(f"  {kind} {pid}: {by[bad[0]].status.value} on seeds {bad} of {len(by)}: "
                                   f"{(by[bad[0]].reason.splitlines() or [''])[0]}")
        worst = max(((r.ratio, -s, r.case) for by in pairs.values() for s, r in by.items() if r.ratio is not None),
                    default=None)
        rows.append([backend, str(len(pairs)), str(len(by_seed)), str(counts["always failing"]),
                     str(counts["flaky"]), f"{worst[0]:.2f} ({-worst[1]}, {worst[2]})" if worst else "-"])
    details = found["flaky"] + found["always failing"]
    more = [f"  ... and {len(details) - 50} more"] if len(details) > 50 else []
    return "\n".join([_text_table(rows), *details[:50], *more]), not details
