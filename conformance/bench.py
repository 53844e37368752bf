"""Latency and achieved bandwidth of backends on chosen cases: a benchmark, never a test.

Each backend is first judged on the case (a wrong kernel's speed is not reported), then its
prepared call (backend.prepare: plans and metadata done once, as an engine does per batch) is
timed with CUDA events: median over `repeats` runs of `iters` back-to-back calls.
GB/s counts the bytes an ideal kernel must move: each sequence's K and V once (in the cache's
dtype), the queries and the output.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .kinds import kind_of
from .registry import Backend
from .result import Status
from .runner import Runner
from .spec import CaseSpec


@dataclass
class BenchRow:
    backend: str
    case: str
    status: str  # the conformance status of the backend on this case; only PASS rows are timed
    reason: str = ""
    latency_us: float | None = None
    gbps: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _seconds_per_call(fn, device: torch.device, iters: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def bench(backends: list[Backend], specs: list[CaseSpec], runner: Runner, iters: int = 20,
          repeats: int = 5) -> list[BenchRow]:
    rows = []
    for spec in specs:
        for backend in backends:
            result = runner.run(backend, spec)
            row = BenchRow(backend.name, spec.id, result.status.value, result.reason.split("\n")[0])
            rows.append(row)
            if result.status != Status.PASS:
                continue
            case = runner.prepared(spec).inputs.materialize(finite_poison=backend.finite_poison)
            backend.write_cache(case)
            fn = backend.prepare(case)
            for _ in range(3):  # warm-up: compiles, autotuning, allocator
                fn()
            seconds = _seconds_per_call(fn, runner.device, iters, repeats)
            row.latency_us = seconds * 1e6
            row.gbps = kind_of(case.spec).bytes_moved(case) / seconds / 1e9
    return rows


def format_bench(rows: list[BenchRow], baselines: list[str]) -> str:
    """Markdown: one row per backend x case; `vs` is throughput relative to the first of
    `baselines` that passed on the same case."""
    lines = ["| case | backend | status | latency (us) | GB/s | vs baseline |", "|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r.case for r in rows):
        of_case = [r for r in rows if r.case == case]
        timed = {r.backend: r for r in of_case if r.gbps}
        base = next((timed[b] for b in baselines if b in timed), None)
        for r in of_case:
            if r.status == "SKIP":
                continue
            vs = f"{r.gbps / base.gbps:.0%} of {base.backend}" if r.gbps and base else ""
            lat = f"{r.latency_us:.1f}" if r.latency_us else r.reason[:60]
            gbps = f"{r.gbps:.4g}" if r.gbps else ""
            lines.append(f"| {case} | {r.backend} | {r.status} | {lat} | {gbps} | {vs} |")
    return "\n".join(lines)
