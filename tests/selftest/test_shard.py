"""shard I/N (--attn-shard, run --shard): every test in exactly one shard, the same split on every machine, balanced by the
durations of an earlier run where it has them (conformance/shard.py)."""
import random
import subprocess
import sys

import pytest

from conformance import SpecError
from conformance.report import write_json
from conformance.result import Result, Status
from conformance.shard import parse_shard, shard_of

KEYS = [f"t{i:03d}" for i in range(100)]


def test_without_durations_shards_split_by_count():
    shards = shard_of(KEYS, 7)
    sizes = [shards.count(s) for s in range(7)]
    assert sum(sizes) == 100 and max(sizes) - min(sizes) <= 1


def test_with_durations_the_longest_shard_is_near_the_ideal_and_the_split_does_not_depend_on_order():
    rng = random.Random(0)
    seconds = {k: rng.expovariate(1.0) for k in KEYS[:80]}  # 20 tests the report does not know
    shards = shard_of(KEYS, 4, seconds)
    cost = {k: seconds.get(k, sorted(seconds.values())[40]) for k in KEYS}
    loads = [sum(cost[k] for k, s in zip(KEYS, shards) if s == i) for i in range(4)]
    assert max(loads) <= sum(loads) / 4 + max(cost.values())  # the longest-processing-time bound
    shuffled = KEYS[::-1]
    assert dict(zip(shuffled, shard_of(shuffled, 4, seconds))) == dict(zip(KEYS, shards))


@pytest.mark.parametrize("text", ["0/3", "4/3", "2", "a/b", "1/0"])
def test_a_bad_shard_names_the_option_and_the_rule(text):
    with pytest.raises(SpecError, match=f"shard = '{text}': must be I/N"):
        parse_shard(text)


def _collect(*args):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_backend.py", "--attn-profile", "quick",  # the smallest: only the split matters
                          "-k", "sdpa and small_decode and fp16", *args],
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if "::" in line}


def test_pytest_shards_cover_the_run_exactly_once(tmp_path):
    every = _collect()
    # An earlier run's report: a second a test, but one (the first) slow enough to fill a shard alone.
    ids = sorted(t.rpartition("[")[2].rstrip("]") for t in every)
    results = [Result(backend=i.partition("-small_decode")[0], case="small_decode" + i.partition("-small_decode")[2],
                      scenario="small_decode", dtype="fp16", block_size=16, heads="", device="cpu",
                      status=Status.PASS, backend_seconds=1e6 if n == 0 else 1.0) for n, i in enumerate(ids)]
    assert [r.id for r in results] == ids
    report = tmp_path / "last.json"
    write_json(str(report), results, {"profile": "quick", "seed": 0, "environment": {}})
    shards = [_collect("--attn-shard", f"{i}/3", "--attn-shard-durations", str(report)) for i in (1, 2, 3)]
    assert set().union(*shards) == every and sum(map(len, shards)) == len(every)
    assert sorted(map(len, shards)) == [1, (len(every) - 1) // 2, len(every) - 1 - (len(every) - 1) // 2]
