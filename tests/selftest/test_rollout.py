"""Rollout vs rescore (conformance/rollout.py): what a batch asks of the rollout, the model's
pieces, and the verdict of a correct adapter (its bugs: test_mutants.py)."""
import torch

from conformance import BatchSpec, CaseSpec, HeadConfig, Runner, Status
from conformance.rollout import Rollout, TinyLM, _rope, reference_logprobs

SHARED = BatchSpec([12, 15, 9, 10], [1, 1, 1, 1], shared_prefix_lens=[10, 7])
SPEC = CaseSpec("t", SHARED, HeadConfig(4, 2, 16), torch.float32, 4, calls="rollout")


def test_a_shared_batch_is_prompts_and_their_samples():
    r = Rollout.of(SHARED)
    assert r.prompt_lens == (10, 7) and r.prompt_of == (0, 0, 1, 1) and r.generated == (2, 5, 2, 3)
    assert r.sample_lens == (11, 14, 8, 9)  # the tokens the model reads: all but the last generated one
    prefill, decode, rescore = r.calls(SPEC)
    assert prefill.batch.seq_lens == prefill.batch.query_lens == (10, 7)
    assert decode.batch.query_lens == (1, 1, 1, 1) and rescore.batch.query_lens == r.sample_lens


def test_rotary_positions_keep_norms_and_make_scores_depend_on_distance_only():
    x = torch.randn(2, 2 * 16, dtype=torch.float64)
    q = _rope(x, torch.tensor([3, 3]), 2)
    assert torch.allclose(q.norm(dim=-1), x.view(2, 2, 16).norm(dim=-1))
    a, b = (_rope(x, torch.tensor([p, p + 5]), 2) for p in (0, 40))
    assert torch.allclose((a[0] * a[1]).sum(-1), (b[0] * b[1]).sum(-1))


def test_the_float64_model_is_causal():
    lm = TinyLM(SPEC, torch.device("cpu"), 0)
    seq = torch.randint(256, (9,))
    whole = reference_logprobs(lm, [seq], torch.float64, "float64")
    prefix = reference_logprobs(lm, [seq[:5]], torch.float64, "float64")
    assert torch.allclose(whole[:5], prefix, atol=1e-12)  # later tokens change nothing before them
    assert not torch.allclose(whole[5:6], reference_logprobs(lm, [seq[:6].flip(0)], torch.float64, "float64")[5:6])


def test_a_correct_adapter_rolls_out_and_rescores_within_the_rule():
    import mutants

    result = Runner("cpu").run(mutants.PagedTorch(), SPEC)
    assert result.status == Status.PASS, result.reason
    assert result.rescore_diff is not None and result.rescore_diff < result.tol
    assert "12 tokens" in result.reason and "every token is the float64 model's choice" in result.reason
