"""Every check of the suite must catch the bug it exists for: each mutant FAILs some case of the
default CPU profile of its kind (dense: mutants.py; MLA: mla_mutants.py), or of the cases named
for it where the cpu profile cannot show the bug, while the same adapter without a bug fails none.
Each test records its mutant, so the run ends with the mutation score (fixtures/pytest_plugin.py)."""
import mla_mutants
import mutants
import pytest
import torch

from conformance import CaseSpec, Runner, Status
from conformance.fixtures import CATALOG
from conformance.fixtures import HEAD_CONFIGS, SCENARIOS

# kind: (the adapter with a `bug` switch, its bugs)
FAMILIES = {"mha": (mutants.PagedTorch, mutants.BUGS), "mla": (mla_mutants.LatentTorch, mla_mutants.BUGS)}
CASES = {kind: CATALOG.cases("cpu", kind=kind) for kind in FAMILIES}
# A far-pages case small enough for a CPU: fp8 caches of 2^31 one-byte elements each (4 GiB in all).
FAR_PAGES = CaseSpec("small_decode", SCENARIOS["small_decode"].cpu, HEAD_CONFIGS["tiny_gqa4_d128"], torch.float16,
                     16, kv_dtype="fp8_e4m3", far_pages=True)
SPECIAL = {"far_pages": [FAR_PAGES]}
PARTS = 4  # the correct adapters' cases in parts, so that pytest-xdist spreads the longest self-test


@pytest.fixture(scope="module")
def runner():
    return Runner("cpu", keep=sum(map(len, CASES.values())))  # the references of the profile, shared by all mutants


def _cases(kind, bug):
    return SPECIAL[mutants.NEEDS[bug]] if kind == "mha" and bug in mutants.NEEDS else CASES[kind]


@pytest.mark.parametrize("kind, part", [(kind, part) for kind in FAMILIES for part in range(PARTS)])
def test_correct_adapter_fails_no_case(kind, part, runner, record_property):
    adapter = FAMILIES[kind][0]()
    specs = (CASES[kind] + [s for special in SPECIAL.values() for s in special if s.kind == kind])[part::PARTS]
    results = [runner.run(adapter, spec) for spec in specs]
    bad = [f"{r.id}: {r.reason}" for r in results if r.status != Status.PASS]
    record_property("correct_adapter", {"name": adapter.name, "cases": len(results), "false_failures": len(bad)})
    assert not bad, bad[:5]


@pytest.mark.parametrize("kind, bug", [(kind, bug) for kind, (_, bugs) in FAMILIES.items() for bug in bugs])
def test_mutant_is_caught(kind, bug, runner, record_property):
    adapter, bugs = FAMILIES[kind]
    mutant = adapter(bug)
    record_property("mutant", mutant.name)
    specs = _cases(kind, bug)
    for spec in specs:
        result = runner.run(mutant, spec)
        assert result.status != Status.ERROR, result.reason
        if result.status == Status.FAIL:
            return
    pytest.fail(f"{kind} mutant {bug} ({bugs[bug]}) passed all {len(specs)} of its cases")


@pytest.mark.parametrize("bug", ["read_past_end", "last_block_len_wrong", "block_table_ignored", "first_block_only"])
def test_finite_poison_still_catches_out_of_bounds_reads(bug, record_property):
    """With finite poison (backends whose kernels mask by multiplying with 0, or --poison finite),
    a read of an unused slot that enters the softmax must still change the output enough to fail.
    (A read the mask then hides, such as one key past the end under a causal mask, passes: only
    NaN poison shows it.)"""
    mutant = mutants.PagedTorch(bug)
    record_property("mutant", f"{mutant.name}-under-finite-poison")
    runner = Runner("cpu", finite_poison=True)
    plain = [s for s in CASES["mha"] if s.scenario in ("mixed_small", "encoder_prefill") and s.dtype == torch.float32
             and s.heads.id == "gqa4-d128" and s.is_plain]
    results = [runner.run(mutant, spec) for spec in plain]
    assert any(r.status == Status.FAIL for r in results), f"{bug} passed {len(plain)} cases under finite poison"
    assert not any("NaN" in r.reason for r in results)  # the poison itself never shows: the numbers do


def test_a_write_into_a_shared_block_is_its_own_failure(runner):
    from conformance import Category

    spec = next(c for c in CASES["mha"] if c.scenario == "shared_prefix_4x8" and c.is_plain)
    result = runner.run(mutants.PagedTorch("shared_block_written"), spec)
    assert Category.SHARED_BLOCK_WRITE in result.categories, result.reason
    assert "slots of shared blocks" in result.reason


@pytest.mark.parametrize("bug, calls, category", [
    ("decode_scale", "tokens", "path-mismatch"),
    ("chunks_forgotten", "chunks", "path-mismatch"),
    ("batch_dependent_split", "invariance", "batch-variant"),
    ("run_to_run_noise", "invariance", "nondeterministic"),
    ("decode_scale", "rollout", "rollout-rescore"),
    ("chunks_forgotten", "rollout", "rollout-rescore"),
    ("shared_block_written", "rollout", "shared-block-write"),
    ("graph_keeps_seq_lens", "graph", "non-finite"),  # the replays read past the new lengths, into poison
    ("batch_wide_q_scale", "graph", "non-finite"),  # the padded replay's NaN padding rows reach the real ones
])
def test_many_calls_name_what_differs(bug, calls, category, runner):
    """A bug between calls is reported as such: the paths (or batches, or runs) differ, beside
    whatever the truth says of each."""
    spec = next(c for c in CASES["mha"] if c.calls == calls)
    result = runner.run(mutants.PagedTorch(bug), spec)
    assert category in [c.value for c in result.categories], result.reason
