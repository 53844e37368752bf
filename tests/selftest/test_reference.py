"""The ground truth against a naive per-sequence, per-head float64 loop, and its own invariants; the
MLA ground truth against its absorbed form."""
import pytest
import torch

import conformance.reference as reference
from conformance import BatchSpec, CaseSpec, HeadConfig, make_inputs, reference_attention
from conformance.fixtures import CATALOG
from conformance.mla import mla_reference
from conformance.paged import dequantize


def naive(inputs):
    """Textbook attention, one sequence, head and query at a time, float64, masks by definition;
    a sink is one more logit whose value row is zero."""
    spec = inputs.spec
    g = spec.heads.group_size
    out = torch.zeros(inputs.q.shape, dtype=torch.float64)
    lse = torch.zeros(inputs.q.shape[:2], dtype=torch.float64)
    starts = inputs.kv_start_loc.tolist()
    t = 0
    for b, (s, ql) in enumerate(zip(spec.batch.seq_lens, spec.batch.query_lens)):
        rows = slice(starts[b], starts[b] + s)
        k = dequantize(inputs.stored("k", rows), inputs.k_scale, torch.float64)
        v = dequantize(inputs.stored("v", rows), inputs.v_scale, torch.float64)
        for i in range(ql):
            p = s - ql + i  # absolute position of this query
            keys = [j for j in range(s)
                    if (not spec.causal or j <= p) and (spec.sliding_window is None or p - j < spec.sliding_window)]
            for h in range(spec.heads.num_q_heads):
                logits = torch.stack([inputs.q[t, h].double() @ k[j, h // g] for j in keys]) * spec.scale
                if spec.softcap:
                    logits = spec.softcap * torch.tanh(logits / spec.softcap)
                values = [v[j, h // g] for j in keys]
                if spec.sinks:
                    logits = torch.cat([logits, inputs.sinks[h:h + 1].double()])
                    values.append(torch.zeros_like(v[0, 0]))
                w = torch.softmax(logits, 0)
                out[t, h] = sum(w[n] * x for n, x in enumerate(values))
                lse[t, h] = torch.logsumexp(logits, 0)
            t += 1
    return out, lse


SPECS = [
    CaseSpec("mixed", BatchSpec([9, 17, 4], [1, 5, 4]), HeadConfig(4, 2, 8), torch.float16, 4),
    CaseSpec("gqa3", BatchSpec([12, 3], [3, 3]), HeadConfig(6, 2, 16), torch.bfloat16, 16),
    CaseSpec("window", BatchSpec([20, 11], [6, 2]), HeadConfig(4, 1, 8), torch.float32, 8, sliding_window=5),
    CaseSpec("softcap", BatchSpec([10, 6], [4, 1]), HeadConfig(2, 2, 8), torch.float16, 4, softcap=0.7),
    CaseSpec("bidir", BatchSpec([7, 13], [7, 13]), HeadConfig(4, 4, 8), torch.float32, 4, causal=False),
    CaseSpec("scale", BatchSpec([8], [3]), HeadConfig(2, 1, 8), torch.float32, 4, scale=0.9),
    CaseSpec("sinks", BatchSpec([9, 4], [3, 4]), HeadConfig(4, 2, 8), torch.float16, 4, sliding_window=3, sinks=True),
    CaseSpec("fp8", BatchSpec([11, 5], [2, 5]), HeadConfig(4, 2, 8), torch.bfloat16, 4, kv_dtype="fp8_e4m3"),
]


@pytest.mark.parametrize("spec", SPECS, ids=[s.scenario for s in SPECS])
def test_reference_matches_naive_loop(spec):
    inputs = make_inputs(spec, "cpu", spec.seed())
    ref = reference_attention(inputs)
    out, lse = naive(inputs)
    assert ref.out.dtype == torch.float64
    torch.testing.assert_close(ref.out, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.lse, lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=[s.scenario for s in SPECS])
def test_key_chunking_does_not_change_the_result(spec, monkeypatch):
    inputs = make_inputs(spec, "cpu", spec.seed())
    whole = reference_attention(inputs)
    monkeypatch.setattr(reference, "SCORE_CHUNK_ELEMENTS", 1)  # 16-key chunks
    chunked = reference_attention(inputs)
    torch.testing.assert_close(chunked.out, whole.out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.lse, whole.lse, rtol=1e-12, atol=1e-12)


def test_window_of_one_returns_each_tokens_own_value():
    spec = CaseSpec("w1", BatchSpec([6, 9], [2, 4]), HeadConfig(4, 2, 8), torch.float32, 4, sliding_window=1)
    inputs = make_inputs(spec, "cpu", 1)
    ref = reference_attention(inputs)
    v_new = inputs.v[inputs.new_token_index].double().repeat_interleave(2, dim=1)  # head h reads kv head h // 2
    torch.testing.assert_close(ref.out, v_new, rtol=0, atol=1e-15)


def test_causal_is_bottom_right_aligned():
    """Decode: the only new token sees the whole sequence (top-left alignment would show it one key)."""
    spec = CaseSpec("dec", BatchSpec([5], [1]), HeadConfig(1, 1, 4), torch.float32, 4)
    inputs = make_inputs(spec, "cpu", 2)
    ref = reference_attention(inputs)
    w = torch.softmax(inputs.q[0, 0].double() @ inputs.k[:, 0].double().T * spec.scale, 0)
    torch.testing.assert_close(ref.out[0, 0], w @ inputs.v[:, 0].double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2), (torch.float32, 1e-5)])
def test_lowp_reference_is_the_dtypes_noise(dtype, bound):
    spec = CaseSpec("n", BatchSpec([40, 64], [8, 64]), HeadConfig(4, 2, 32), dtype, 16)
    inputs = make_inputs(spec, "cpu", 3)
    ref, lowp = reference_attention(inputs), reference_attention(inputs, "lowp")
    err = (lowp.out.double() - ref.out).abs().max().item()
    assert lowp.out.dtype == dtype
    assert 0 < err < bound


def test_bad_precision_is_named():
    inputs = make_inputs(SPECS[0], "cpu", 0)
    with pytest.raises(ValueError, match="precision = 'fp8': must be 'float64', 'lowp' or 'tf32'"):
        reference_attention(inputs, "fp8")


def test_fp8_reference_reads_the_quantized_cache():
    """An fp8 case's truth is attention over code * scale, not over the unquantized draws."""
    spec = SPECS[-1]
    inputs = make_inputs(spec, "cpu", 4)
    assert spec.cache_dtype == torch.float8_e4m3fn
    assert 0 < inputs.k_scale != inputs.v_scale > 0 and 1.0 not in (inputs.k_scale, inputs.v_scale)
    exact = dequantize(inputs.stored("k"), inputs.k_scale, torch.float64)
    assert 0 < (exact - inputs.k.double()).abs().max() < 0.1 * inputs.k.double().abs().max()
    raw = reference_attention(make_inputs(spec.replace(kv_dtype="auto"), "cpu", 4)).out
    assert (reference_attention(inputs).out - raw).abs().max() > 1e-3


@pytest.mark.parametrize("spec", [s for s in CATALOG.cases("cpu", kind="mla") if s.dtype == torch.float32
                                  and s.block_size == 16], ids=lambda s: s.id)
def test_mla_expanded_and_absorbed_forms_agree(spec):
    """The MLA ground truth (expanded MHA) and the absorbed MQA form are one computation in float64."""
    inputs = make_inputs(spec, "cpu", spec.seed())
    expanded, absorbed = (mla_reference(inputs, "float64", form) for form in ("expanded", "absorbed"))
    assert expanded.out.dtype == torch.float64
    torch.testing.assert_close(absorbed.out, expanded.out, rtol=0, atol=1e-12)
    torch.testing.assert_close(absorbed.lse, expanded.lse, rtol=0, atol=1e-12)
    # Outputs a softmax-weighted mean of unit-variance values over n keys: about sqrt(e / n), not
    # vanishing or blowing up.
    assert 0.5 * max(spec.batch.seq_lens) ** -0.5 < float(expanded.out.std()) < 2, float(expanded.out.std())
