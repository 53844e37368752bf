"""`python -m conformance run`: every registered backend over a profile on this machine's device.
`python -m conformance list`: backends (with availability) and scenarios."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .matrix import default_profile, select_cases
from .registry import load_backends
from .report import BAD, environment, format_table, summarize, write_json
from .runner import Runner


def _csv(values: list[str] | None) -> list[str] | None:
    return [x for v in values for x in v.split(",") if x] if values else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the conformance matrix and print a backend x scenario table")
    run.add_argument("--backend", action="append", help="backend name(s), comma-separated or repeated (default: all)")
    run.add_argument("--scenario", action="append", help="scenario name(s) (default: all of the profile)")
    run.add_argument("--profile", choices=("cpu", "gpu"), help="case sizes (default: gpu with CUDA, else cpu)")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--seed", type=int, default=0, help="base seed mixed into every case's seed (default 0)")
    run.add_argument("--json", default="conformance-report.json", help="JSON report path ('' to skip)")
    run.add_argument("--load", action="append", default=[], help="also import this adapter module")
    lst = sub.add_parser("list", help="list registered backends and scenarios")
    lst.add_argument("--load", action="append", default=[], help="also import this adapter module")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    backends = load_backends(tuple(args.load))
    if args.command == "list":
        return _list(backends)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = _csv(args.backend) or sorted(backends)
    unknown = [n for n in names if n not in backends]
    if unknown:
        print(f"--backend {unknown}: not registered (registered: {', '.join(sorted(backends))})", file=sys.stderr)
        return 2
    profile = args.profile or default_profile()
    cases = select_cases(profile, _csv(args.scenario))
    runner = Runner(device, base_seed=args.seed)
    total, results, start, last = len(cases) * len(names), [], time.time(), 0.0
    print(f"{len(cases)} cases x {len(names)} backends on {device} (profile {profile}, seed {args.seed})",
          file=sys.stderr)
    for spec in cases:  # backends inner: a case's references are computed once for all of them
        for name in names:
            results.append(runner.run(backends[name], spec))
            now = time.time()
            if now - last > 5 or len(results) == total:
                bad = sum(r.status in BAD for r in results)
                print(f"[{len(results)}/{total}] {now - start:.0f}s, {bad} failing; at {results[-1].id}",
                      file=sys.stderr, flush=True)
                last = now
    print(format_table(results))
    print(summarize(results))
    print(f"{len(results)} results in {time.time() - start:.1f}s")
    if args.json:
        write_json(args.json, results, {"profile": profile, "seed": args.seed, "environment": environment(device),
                                        "backends": {n: backends[n].description for n in names}})
        print(f"JSON report: {args.json}")
    return 1 if any(r.status in BAD for r in results) else 0


def _list(backends) -> int:
    from fixtures import SCENARIOS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, b in sorted(backends.items()):
        why = b.unavailable() or (None if device.type in b.capabilities.devices else f"needs {sorted(b.capabilities.devices)}")
        print(f"{name:16} {'ok' if not why else 'unavailable: ' + why:40} {b.description}")
    print()
    for s in SCENARIOS.values():
        cpu = "cpu+gpu" if s.cpu else "gpu only"
        print(f"{s.name:24} {cpu:8} seq_lens={list(s.gpu.seq_lens)[:8]}{'...' if s.gpu.batch_size > 8 else ''} "
              f"query_lens={list(s.gpu.query_lens)[:8]}{'...' if s.gpu.batch_size > 8 else ''}"
              f"{'' if s.causal else ' non-causal'}")
    return 0
