"""`python -m conformance run`: every registered backend over a profile on this machine's device.
`python -m conformance list`: backends (with availability), KV-cache managers and scenarios.
`python -m conformance report A.json [B.json.xz ...] [--html r.html --heatmap h.png]`: several JSON
reports as one Markdown table (and an HTML report, a heatmap).
`python -m conformance diff last.json tonight.json`: the pairs that changed; exit 1 on a regression.
`python -m conformance bench --scenario large_decode --backend triton,flashinfer-decode-fa2`: latency and GB/s.
`python -m conformance warm-up --backend flashinfer-prefill-fa2 -j 8`: only build JIT-compiled kernels.
`python -m conformance flake-check --seeds 20`: the same cases over 20 base seeds; any pair that
fails on one seed and passes on another is reported."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections import deque
from itertools import groupby

from conformance.fixtures import CATALOG

from .bench import bench, format_bench
from .config import RunConfig
from .diff import diff_reports
from .html import write_heatmap, write_html
from .managers import load_managers
from .matrix import default_device, default_profile, split_names
from .modes import case_bytes
from .options import add_options, default
from .registry import RegistryError, load_backends, select_backends
from .report import (environment, failing, flake_summary, format_cost, format_table, read_json, summarize,
                     write_json)
from .runner import Runner
from .spec import DTYPES, KV_DTYPES, CaseSpec, SpecError


_COMMANDS = {  # each command's help; its options are the options table's (options.py)
    "run": "run the conformance matrix and print a backend x scenario table",
    "flake-check": "run the cases over several base seeds; report pairs that pass on one seed and fail on another",
    "warm-up": "only build the JIT-compiled kernel variants a run would need",
    "bench": "latency and GB/s of backends on chosen cases (judged first)",
    "list": "list registered backends, KV-cache managers and scenarios",
    "report": "merge JSON reports into one Markdown support table",
    "diff": "what changed between two JSON reports (regressions first; exit 1 if any)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conformance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    commands = {name: sub.add_parser(name, help=text, description=text) for name, text in _COMMANDS.items()}
    for name, command in commands.items():
        add_options(command.add_argument, name)
    commands["report"].add_argument("reports", nargs="+", help="JSON reports written by `run --json` or "
                                    "`pytest --attn-json`")
    commands["diff"].add_argument("before", help="the earlier report (e.g. last night's, merged with `report --json`)")
    commands["diff"].add_argument("after", help="the later report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":
        return _flakes(args.reports) if args.flakes else _report(args.reports, args.json, args.html, args.heatmap,
                                                                 args.reestimate)
    if args.command == "diff":
        text, code = diff_reports(args.before, args.after, args.ratio_factor, args.ratio_floor, args.exact)
        print(text)
        return code
    if args.command == "list":
        return _list(load_backends(tuple(args.load)), load_managers(tuple(args.load)))
    if args.command == "bench":
        return _bench(args)
    try:
        config = RunConfig.from_options(lambda name: getattr(args, name, default(name)), CATALOG,
                                        main_job=args.command == "run")
    except (RegistryError, SpecError) as e:
        print(e, file=sys.stderr)
        return 2
    if args.command == "warm-up":
        config.warm_up()
        return 0
    config.warm_up()
    pairs = config.pairs()
    ids = [f"{b.name}-{s.id}" for b, s in pairs]
    pairs = [pair for pair, keep in zip(pairs, config.in_shard(ids, ids)) if keep]
    print(f"{len(pairs)} backend x case pairs ({len(config.cases)} cases, {len(config.backends)} backends) on "
          f"{config.device} (profile {config.profile})", file=sys.stderr)
    if args.command == "flake-check":
        return _flake_check(args, config, pairs)
    start = time.time()
    results = _run_pairs(pairs, config.runners())
    print(format_table(results))
    print(summarize(results, verbose=args.verbose))
    print(f"{len(results)} results in {time.time() - start:.1f}s")
    if args.json:
        write_json(args.json, results, config.report_meta())
        print(f"JSON report: {args.json}")
    return 1 if any(failing(r) for r in results) else 0


def _run_pairs(pairs, runners, label: str = "") -> list:
    """Every (backend, case) pair through the runners (one a GPU), in pair order, with a progress line
    every few seconds. Each runner takes the next case's pairs when it is free (a case's backends
    stay together: its references are computed once)."""
    cases = deque(list(group) for _, group in groupby(enumerate(pairs), key=lambda ip: ip[1][1]))
    results: list = [None] * len(pairs)
    lock, count = threading.Lock(), {"done": 0, "failing": 0}

    def work(runner):
        with runner:
            while True:
                with lock:
                    if not cases:
                        return
                    group = cases.popleft()
                for i, (backend, spec) in group:
                    results[i] = runner.run(backend, spec)
                    with lock:
                        count["done"] += 1
                        count["failing"] += failing(results[i])

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in runners]
    start = time.time()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=5)
        print(f"{label}[{count['done']}/{len(pairs)}] {time.time() - start:.0f}s, {count['failing']} failing",
              file=sys.stderr, flush=True)
    if None in results:  # a runner thread died: its harness error, not a case's
        raise RuntimeError(f"{results.count(None)} pairs got no result (a runner failed; see above)")
    return results


def _flake_check(args, config: RunConfig, pairs) -> int:
    by_seed, start = {}, time.time()
    for seed in range(config.seed, config.seed + args.seeds):
        by_seed[seed] = _run_pairs(pairs, [config.runner(seed)], f"seed {seed} ")
        if args.json:
            write_json(f"{args.json.removesuffix('.json')}.seed{seed}.json", by_seed[seed], config.report_meta(seed))
    return _print_flakes(by_seed, f"flake check: {len(pairs)} backend x case pairs x {args.seeds} base seeds "
                                  f"({config.seed}..{config.seed + args.seeds - 1}) on {config.device}, "
                                  f"profile {config.profile}, in {time.time() - start:.0f}s")


def _flakes(paths: list[str]) -> int:
    """flake_summary over reports grouped by their base seed (xdist workers' reports of one seed merge)."""
    by_seed: dict[int, list] = {}
    for path in paths:
        meta, results = read_json(path)
        by_seed.setdefault(meta["seed"], []).extend(results)
    return _print_flakes(by_seed, f"{len(paths)} reports, base seeds {sorted(by_seed)}")


def _print_flakes(by_seed: dict, header: str) -> int:
    text, clean = flake_summary(by_seed)
    print(header)
    print(text)
    print("no pair failed on any seed" if clean else "FAILING or FLAKY pairs above")
    return 0 if clean else 1


def _report(paths: list[str], merged_path: str = "", html_path: str = "", heatmap_path: str = "",
            reestimate: bool = False) -> int:
    """Markdown on stdout: the runs' environments, then one table over all results (and the files
    asked for). A result for a backend and case that an earlier report also holds replaces it (a rerun)."""
    by_id, runs, backends = {}, {}, {}
    for path in paths:
        meta, rs = read_json(path)
        by_id.update((r.id, r) for r in rs)
        backends.update(meta.get("backends", {}))
        env = meta["environment"]
        run = f"profile {meta['profile']}, seed {meta['seed']}, " + ", ".join(
            f"{k} {v}" for k, v in env.items() if v is not None)
        runs.setdefault(run, (meta, []))[1].append(path.rsplit("/", 1)[-1])
    results = list(by_id.values())
    first = next(iter(runs.values()))[0]
    if reestimate:
        results = _reestimated(results, first["profile"])
    if html_path:  # first: a reader that stops early (`| head`) must not cost the files
        write_html(html_path, results, first["profile"], first["seed"],
                   [f"{', '.join(names)}: {run}" for run, (_, names) in runs.items()])
    if heatmap_path:
        write_heatmap(heatmap_path, results)
    if merged_path:
        write_json(merged_path, results, {"profile": first["profile"], "seed": first["seed"],
                                          "environment": first["environment"], "backends": backends,
                                          "merged_from": [n for _, names in runs.values() for n in names]})
    lines = ["# Conformance results", ""]
    lines += [f"- {', '.join(f'`{n}`' for n in names)}: {run}" for run, (_, names) in runs.items()]
    lines += ["", "Cell: passed/run, r = worst err/tol (at most 1 passes), xf = known failures, s = skipped.", "",
              format_table(results, markdown=True), "", "```", summarize(results, verbose=True), "```", "",
              "### Cost", "", format_cost(results)]
    print("\n".join(lines))
    return 1 if any(failing(r) for r in results) else 0


def _reestimated(results: list, profile: str) -> list:
    """The results with their memory estimates made again by this version's rule, where the case id
    is one of the profile's and the backend is registered (else as they were)."""
    specs = {s.id: s for s in CATALOG.cases(profile, None)}
    backends = load_backends()
    return [dataclasses.replace(r, memory_estimate=case_bytes(specs[r.case], backends[r.backend].capabilities.cache_copies))
            if r.memory_estimate is not None and r.case in specs and r.backend in backends else r for r in results]


def _list(backends, managers) -> int:
    device = default_device()
    for name, b in sorted(backends.items()):
        wrong_device = device.type not in b.capabilities.devices
        why = b.unavailable() or (f"needs {sorted(b.capabilities.devices)}" if wrong_device else None)
        print(f"{name:16} {'ok' if not why else 'unavailable: ' + why:40} {b.description}")
    print()
    for name, m in sorted(managers.items()):
        print(f"{name:16} {'KV-cache manager':40} {m.description}")
    print()
    for s in CATALOG.scenarios.values():
        cpu = "cpu+gpu" if s.cpu else "gpu only"
        print(f"{s.name:24} {cpu:8} seq_lens={list(s.gpu.seq_lens)[:8]}{'...' if s.gpu.batch_size > 8 else ''} "
              f"query_lens={list(s.gpu.query_lens)[:8]}{'...' if s.gpu.batch_size > 8 else ''}"
              f"{'' if s.causal else ' non-causal'}")
    return 0


def _bench(args) -> int:
    try:
        if not args.backend or not args.scenario:
            raise SpecError(f"bench: --backend = {args.backend} and --scenario = {args.scenario}: both are needed "
                            f"(a benchmark of everything would take hours)")
        backends = select_backends(split_names(args.backend), tuple(args.load))
        profile = args.profile or default_profile()
        if profile not in CATALOG.profiles:
            raise SpecError(f"profile = {profile!r}: must be one of {sorted(CATALOG.profiles)}")
        sizes = CATALOG.profiles[profile].sizes  # the scenarios' batch sizes of that profile
        heads = CATALOG.head_config(args.heads)
        scenarios = [CATALOG.scenario(name) for name in split_names(args.scenario)]
        specs = [CaseSpec(sc.name, sc.batch(sizes), heads, DTYPES[args.dtype], args.block_size, causal=sc.causal,
                          kv_dtype=args.kv_dtype)
                 for sc in scenarios if sc.batch(sizes) is not None]
    except (RegistryError, SpecError) as e:
        print(e, file=sys.stderr)
        return 2
    device = default_device(args.device)
    rows = bench(backends, specs, Runner(device), iters=args.iters)
    env = environment(device)
    print(f"{env.get('gpu') or env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"flashinfer {env['flashinfer']}; median of 5 x {args.iters} calls\n")
    print(format_bench(rows, split_names(args.baseline) or []))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": [r.to_dict() for r in rows]}, f, indent=1)
    return 1 if any(r.status not in ("PASS", "SKIP") for r in rows) else 0
