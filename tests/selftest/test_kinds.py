"""Case kinds: each kind draws, references and checks its own cases; the rest of the suite only
looks the kind up. The bench's bytes per call come from the kind too (an MLA case has no K/V cache)."""

from conformance import Runner, Status
from conformance.bench import bench
from conformance.kinds import KINDS, kind_of
from conformance.fixtures import CATALOG
from mla_mutants import LatentTorch
from mutants import PagedTorch


def test_every_kind_of_the_catalog_has_its_object():
    assert {spec.kind for spec in CATALOG.cases("quick")} == set(KINDS)


def test_the_bench_counts_each_kinds_own_bytes_and_times_it():
    dense = next(s for s in CATALOG.cases("quick", ["small_decode"], kind="mha") if s.is_plain)
    mla = CATALOG.cases("quick", kind="mla")[0]
    runner = Runner("cpu")
    rows = bench([PagedTorch()], [dense], runner, iters=1, repeats=1) + \
        bench([LatentTorch()], [mla], runner, iters=1, repeats=1)
    assert [r.status for r in rows] == [Status.PASS.value] * 2 and all(r.gbps > 0 for r in rows)

    h, seq = dense.heads, sum(dense.batch.seq_lens)
    case = runner.prepared(dense).inputs.materialize()
    kv = 2 * seq * h.num_kv_heads * h.head_dim * case.k_cache.element_size()
    q_out = 2 * dense.batch.num_query_tokens * h.num_q_heads * h.head_dim * case.q.element_size()
    assert kind_of(dense).bytes_moved(case) == kv + q_out

    case = runner.prepared(mla).inputs.materialize()
    latent = sum(mla.batch.seq_lens) * case.latent_cache.shape[-1] * case.latent_cache.element_size()
    assert kind_of(mla).bytes_moved(case) == latent + case.q.numel() * case.q.element_size() + \
        case.out.numel() * case.out.element_size()
    assert case.latent_cache.dim() == 3 and not hasattr(case, "k_cache")  # what the old dense count read


def test_a_profile_holds_its_cases_by_kind_and_each_kind_its_own():
    import pytest

    from conformance import SpecError
    from conformance.fixtures import SCENARIOS
    from conformance.matrix import MLAProfile, Profile

    quick = CATALOG.profiles["quick"]
    assert set(quick.kinds) == set(KINDS) and all(part.kind == kind for kind, part in quick.kinds.items())
    for kind in KINDS:
        assert {c.kind for c in quick.cases(SCENARIOS, kind)} == {kind}
    dense = quick.kinds["mha"]
    with pytest.raises(SpecError, match=r"Profile\(mine\).kinds\['mla'\] = DenseProfile: must be keyed by its kind"):
        Profile("mine", "cpu", kinds={"mla": dense})
    with pytest.raises(SpecError, match=r"kinds\['gqa'\] = MLAProfile"):
        Profile("mine", "cpu", kinds={"gqa": MLAProfile((), (), (), ())})
