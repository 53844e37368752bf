"""Scenario, head-config and case validation; the catalog; case seeds."""
import pytest
import torch

from conformance import BatchSpec, CaseSpec, HeadConfig, SpecError
from conformance.fixtures import CATALOG
from conformance.fixtures import PROFILES, SCENARIOS

H = HeadConfig(4, 1, 64)


@pytest.mark.parametrize("seq, query, message", [
    ([], [], "BatchSpec.seq_lens = (): a batch needs at least one sequence"),
    ([8, 8], [1], "BatchSpec.query_lens = (1,): must have one entry per sequence (2 seq_lens given)"),
    ([8, 4], [1, 5], "BatchSpec.query_lens[1] = 5: must not exceed seq_lens[1] = 4"),
    ([8, 0], [1, 1], "BatchSpec.query_lens[1] = 1: must not exceed seq_lens[1] = 0"),
    ([8, -3], [1, 1], "BatchSpec.seq_lens[1] = -3: must be an int >= 0"),
    ([8], [0], "BatchSpec.query_lens[0] = 0: must be >= 1 (every sequence brings a new token) unless the sequence "
               "is empty (seq_lens[0] = 8, not 0)"),
    ([0, 0], [0, 0], "BatchSpec.seq_lens = (0, 0): a batch needs a non-empty sequence"),
    ([8, 2], [1, -1], "BatchSpec.query_lens[1] = -1: must be an int >= 0"),
    ([8.0], [1], "BatchSpec.seq_lens[0] = 8.0: must be an int >= 0"),
    ("abc", [1], "BatchSpec.seq_lens = 'abc': must be a list or tuple of ints"),
])
def test_batch_spec_errors_name_field_value_and_rule(seq, query, message):
    with pytest.raises(SpecError) as e:
        BatchSpec(seq, query)
    assert str(e.value).startswith(message)


def test_batch_spec_derived_lengths():
    b = BatchSpec([32, 40, 48], [1, 5, 48])
    assert b.context_lens == (31, 35, 0) and b.num_query_tokens == 54 and not b.is_decode and not b.has_empty
    padded = BatchSpec([0, 9, 0], [0, 1, 0])
    assert padded.is_decode and padded.has_empty and padded.num_query_tokens == 1


def test_empty_sequences_and_adversarial_variants_in_the_id_and_features():
    spec = CaseSpec("padded", BatchSpec([0, 9], [0, 1]), H, torch.float16, 16)
    assert spec.features == {"causal", "empty_sequences"}
    spec = spec.replace(logit_std=2500.0, far_pages=True)
    assert spec.id == "padded-fp16-bs16-gqa4-d64-logits2500-farpages"
    for field, value, rule in (("logit_std", 0, "must be a number > 0"), ("far_pages", 1, "must be True or False")):
        with pytest.raises(SpecError, match=f"CaseSpec.{field} = {value!r}: {rule}"):
            spec.replace(**{field: value})


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_q_heads=6, num_kv_heads=4, head_dim=64), "HeadConfig.num_kv_heads = 4: must divide num_q_heads = 6"),
    (dict(num_q_heads=0, num_kv_heads=1, head_dim=64), "HeadConfig.num_q_heads = 0: must be an int >= 1"),
])
def test_head_config_errors(kwargs, message):
    with pytest.raises(SpecError, match=message):
        HeadConfig(**kwargs)


@pytest.mark.parametrize("changes, message", [
    (dict(sliding_window=8, causal=False), "CaseSpec.sliding_window = 8: needs a causal case"),
    (dict(sliding_window=0), "CaseSpec.sliding_window = 0: must be None or an int >= 1"),
    (dict(block_size=0), "CaseSpec.block_size = 0: must be an int >= 1"),
    (dict(dtype=torch.float64), "CaseSpec.dtype = torch.float64: must be one of"),
    (dict(kv_dtype="int4"), "CaseSpec.kv_dtype = 'int4': must be one of"),
    (dict(softcap=-1.0), "CaseSpec.softcap = -1.0: must be None or > 0"),
    (dict(sinks=1), "CaseSpec.sinks = 1: must be True or False"),
])
def test_case_spec_errors(changes, message):
    base = dict(scenario="x", batch=BatchSpec([8], [1]), heads=H, dtype=torch.float16, block_size=16)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CaseSpec(**{**base, **changes})


def test_unknown_scenario_and_profile_are_named():
    with pytest.raises(SpecError, match=r"scenario = \['nope'\]: not in the catalog"):
        CATALOG.cases("cpu", ["nope"])
    with pytest.raises(SpecError, match="profile = 'tpu'"):
        CATALOG.cases("tpu")


VLLM = {  # name: (seq_lens, query_lens) as vLLM's tests/v1/attention define them
    "small_decode": ([32, 40], [1, 1]),
    "small_prefill": ([32, 40], [8, 8]),
    "mixed_small": ([32, 40, 48, 56], [1, 1, 5, 5]),
    "medium_decode": ([128, 256, 512, 1024] * 2, [1] * 8),
    "medium_prefill": ([256, 512, 1024, 2048], [16] * 4),
    "mixed_medium": ([512, 1024, 2048] * 2, [1, 1, 1, 7, 7, 7]),
    "large_decode": ([2048] * 32, [1] * 32),
    "large_prefill": ([4096] * 8, [32] * 8),
    "mixed_large": ([1024, 2048, 4096] * 2, [1, 1, 1, 32, 32, 32]),
    "single_decode": ([1024], [1]),
    "single_prefill": ([1024], [64]),
    "spec_decode_small": ([128, 256, 512, 1024], [4] * 4),
    "spec_decode_medium": ([512, 1024, 2048] * 2, [8] * 6),
    "chunked_context_prefill": ([1568, 520, 8, 80, 96, 8], [32, 8, 8, 16, 16, 8]),
}


@pytest.mark.parametrize("name", VLLM)
def test_catalog_has_vllm_scenarios_at_full_size(name):
    seq, query = VLLM[name]
    assert SCENARIOS[name].gpu == BatchSpec(seq, query)


@pytest.mark.parametrize("name", SCENARIOS)
def test_cpu_twin_keeps_the_structure(name):
    s = SCENARIOS[name]
    if s.cpu is None:
        assert name in ("long_context", "wide_decode", "shared_prefix_1x64")
        return
    if s.gpu.shared_prefix_lens:  # fewer prompts and samples, still groups sharing a prompt
        assert s.cpu.shared_prefix_lens and s.cpu.group_size >= 2
    else:
        assert s.cpu.batch_size == s.gpu.batch_size
    assert s.cpu.is_decode == s.gpu.is_decode
    # Pure-prefill sequences stay pure prefill, decode stays decode.
    for (gs, gq), (cs, cq) in zip(zip(s.gpu.seq_lens, s.gpu.query_lens), zip(s.cpu.seq_lens, s.cpu.query_lens)):
        assert (gs == gq) == (cs == cq) and (gq == 1) == (cq == 1)


def test_encoder_prefill_is_non_causal_and_others_causal():
    assert [n for n, s in SCENARIOS.items() if not s.causal] == ["encoder_prefill"]


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_case_ids_are_unique(profile):
    ids = [c.id for c in CATALOG.cases(profile)]
    assert len(ids) == len(set(ids))


def test_seed_depends_on_case_and_base_seed_only():
    a = CaseSpec("x", BatchSpec([8], [1]), H, torch.float16, 16)
    assert a.seed() == CaseSpec("x", BatchSpec([8], [1]), H, torch.float16, 16).seed()
    assert a.seed() != a.replace(block_size=32).seed()
    assert a.seed() != a.seed(base_seed=1)
    # Same name, different batch (custom cases): different data.
    assert a.seed() != a.replace(batch=BatchSpec([9], [1])).seed()
    assert a.seed() == 7290236068632305522  # stable across processes and runs (no salted hash)


def test_case_id_reads_like_a_k_expression():
    c = CaseSpec("mixed_small", SCENARIOS["mixed_small"].gpu, HeadConfig(32, 8, 128), torch.bfloat16, 16)
    assert c.id == "mixed_small-bf16-bs16-gqa4-d128"
    assert c.replace(sliding_window=128, softcap=4.0).id == "mixed_small-bf16-bs16-gqa4-d128-sw128-cap4"
    fp8_sinks = c.replace(kv_dtype="fp8_e4m3", sinks=True)
    assert fp8_sinks.id == "mixed_small-bf16-bs16-gqa4-d128-kvfp8e4m3-sinks"
    assert fp8_sinks.features == {"causal", "sinks"} and fp8_sinks.cache_dtype == torch.float8_e4m3fn


def test_mla_case_id_scale_and_rules():
    from conformance import MLAHeads

    c = CaseSpec("mixed_small", SCENARIOS["mixed_small"].cpu, MLAHeads(16), torch.bfloat16, 64)
    assert (c.kind, c.id) == ("mla", "mixed_small-bf16-bs64-h16")
    assert c.replace(kv_dtype="fp8_e4m3").id == "mixed_small-bf16-bs64-h16-kvfp8e4m3"
    assert c.scale == 192 ** -0.5 and c.heads.latent_dim == 576 and c.heads.num_kv_heads == 1
    assert MLAHeads(16, kv_lora_rank=256).id == "h16-l256-r64-n128-v128"
    for change, field in (({"sliding_window": 8}, "sliding_window"), ({"softcap": 4.0}, "softcap"),
                          ({"sinks": True}, "sinks"), ({"kv_layout": "hnd"}, "kv_layout"), ({"causal": False}, "causal")):
        with pytest.raises(SpecError, match=rf"CaseSpec\.{field} = .*heads are MLAHeads"):
            c.replace(**change)
    with pytest.raises(SpecError, match=r"MLAHeads\.kv_lora_rank = 0: must be an int >= 1"):
        MLAHeads(16, kv_lora_rank=0)


def test_select_cases_by_kind():
    mla = CATALOG.cases("cpu", kind="mla")
    assert mla and {c.kind for c in mla} == {"mla"} and {c.heads.id for c in mla} == {"h16", "h128"}
    assert {c.kind for c in CATALOG.cases("cpu", kind="mha")} == {"mha"}
    with pytest.raises(SpecError, match="kind = 'gqa'"):
        CATALOG.cases("cpu", kind="gqa")
