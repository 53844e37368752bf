"""Warm-up: build the kernels a run will need before its first case, in parallel processes.

Libraries that compile a kernel per variant on first use (FlashInfer's JIT: a minute of nvcc per
variant on sm_90) say what selects a variant through Backend.compile_key(spec). Before the run,
one case per key (the smallest) is run in a pool of worker processes, so the compiles overlap and
land in the library's own on-disk cache; the run itself then only loads them, and its per-case
times are kernel times. Warm-up results are not judged here: every case runs again in the run.
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from .registry import Backend, load_backends
from .modes import mode_of
from .runner import Runner
from .spec import CaseSpec

HEARTBEAT_SECONDS = 30  # how often a warm-up with nothing finished says what it is still building


def warm_up_plan(backends: list[Backend], specs: list[CaseSpec], device: torch.device,
                 wanted=None) -> list[tuple[str, CaseSpec]]:
    """(backend name, smallest case) for every compile key the run will meet, skipped cases excluded
    (and pairs for which wanted(backend, spec) is false: a run that selects fewer)."""
    smallest: dict[tuple, CaseSpec] = {}
    for backend in backends:
        for spec in specs:
            try:
                key = backend.compile_key(spec)
                if (key is None or mode_of(spec).refusal(backend, spec, device)
                        or (wanted and not wanted(backend, spec))):
                    continue
            except Exception:  # noqa: BLE001 - the run reports the adapter's error on this case
                continue
            key = (backend.name, key)
            if key not in smallest or _size(spec) < _size(smallest[key]):
                smallest[key] = spec
    return [(key[0], spec) for key, spec in smallest.items()]


def _size(spec: CaseSpec) -> int:
    return sum(spec.batch.seq_lens) * spec.heads.num_q_heads


def _warm_one(name: str, spec: CaseSpec, device: str, modules: tuple[str, ...]) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    result = Runner(device).run(load_backends(modules)[name], spec)
    status = result.status.value + (f" ({result.reason.splitlines()[0]})" if result.reason else "")
    return f"{name}-{spec.id}", status, time.perf_counter() - t0


def warm_up(backends: list[Backend], specs: list[CaseSpec], device: torch.device, jobs: int,
            modules: tuple[str, ...] = (), wanted=None) -> None:
    """Run one case per compile key in `jobs` fresh processes (spawned: CUDA cannot be forked)."""
    plan = warm_up_plan(backends, specs, device, wanted)
    if not plan or jobs < 1:
        return
    print(f"warm-up: building {len(plan)} kernel variants in {jobs} processes (FlashInfer's JIT: about a minute of "
          f"nvcc each on a cold cache; a warm one loads them in seconds):\n"
          + "\n".join(f"  {name}-{spec.id}" for name, spec in plan), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        where = {b.name: type(b).__module__ for b in backends}  # a spawned process imports it to find the backend
        futures = {pool.submit(_warm_one, name, spec, str(device), (*modules, where[name])): f"{name}-{spec.id}"
                   for name, spec in plan}
        waiting = set(futures)
        while waiting:
            done, waiting = wait(waiting, timeout=HEARTBEAT_SECONDS, return_when=FIRST_COMPLETED)
            for f in done:
                case, status, seconds = f.result()
                print(f"warm-up: {case} {status} {seconds:.0f}s", file=sys.stderr, flush=True)
            if not done:  # a long silence reads as a hang: say what is still building
                print(f"warm-up: {len(plan) - len(waiting)}/{len(plan)} built in {time.perf_counter() - t0:.0f}s; "
                      f"still building: {', '.join(sorted(futures[f] for f in waiting))}", file=sys.stderr, flush=True)
    print(f"warm-up: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
