"""Shards of a run for a CI job matrix (`--shard I/N`): every test in exactly one shard, the same
split on every machine, balanced by the durations an earlier run recorded (`--shard-durations`,
its JSON reports), else by counts.

The split is the longest-processing-time rule: tests by decreasing duration (ties by id), each to
the shard with the least time so far (ties to the lowest). A test the reports do not know (a new
case, a self-test) counts as their median test; without reports every test counts the same.
"""
from __future__ import annotations

import statistics

from .report import read_json
from .spec import SpecError


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), 1 <= I <= N."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise SpecError(f"shard = {text!r}: must be I/N, two integers with 1 <= I <= N (e.g. 2/8)")
    return int(i), int(n)


def load_durations(paths) -> dict[str, float]:
    """Seconds per result id (backend and case: a conformance test's parameter id) in JSON reports,
    the backend's and the harness's time together; a later report's value replaces an earlier's."""
    seconds = {}
    for path in paths:
        _, results = read_json(path)
        seconds.update((r.id, r.seconds) for r in results)
    return seconds


def shard_of(keys: list[str], n: int, durations: dict[str, float] | None = None) -> list[int]:
    """The shard (0..n-1) of each key: balanced by `durations` where known, by count otherwise."""
    durations = durations or {}
    known = [durations[k] for k in keys if k in durations]
    default = statistics.median(known) if known else 1.0
    cost = [durations.get(k, default) for k in keys]
    loads, out = [0.0] * n, [0] * len(keys)
    for j in sorted(range(len(keys)), key=lambda j: (-cost[j], keys[j])):
        s = min(range(n), key=lambda s: (loads[s], s))
        out[j] = s
        loads[s] += cost[j]
    return out
