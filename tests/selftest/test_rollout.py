"""Rollout vs rescore (conformance/rollout/, modes/rollout.py): what a batch asks of the rollout, the model's
pieces, and the verdict of a correct adapter (its bugs: test_mutants.py)."""
import torch

from conformance import BatchSpec, CaseSpec, HeadConfig, Runner, Status
from conformance.modes.rollout import ROLLOUT
from conformance.rollout.model import TinyLM, _rope, reference_logprobs
from conformance.rollout.schedule import Rollout, Step

SHARED = BatchSpec([12, 15, 9, 10], [1, 1, 1, 1], shared_prefix_lens=[10, 7])
SPEC = CaseSpec("t", SHARED, HeadConfig(4, 2, 16), torch.float32, 4, calls="rollout")


def test_a_shared_batch_is_prompts_and_their_samples():
    r = Rollout.of(SHARED)
    assert r.prompt_lens == (10, 7) and r.prompt_of == (0, 0, 1, 1) and r.generated == (2, 5, 2, 3)
    assert r.sample_lens == (11, 14, 8, 9)  # the tokens the model reads: all but the last generated one
    steps = [op for op in r.schedule() if isinstance(op, Step)]
    assert steps[0] == Step("prompt", (0, 1), (0, 0), (10, 7))
    # Samples 2..5 forked from prompts 0, 0, 1, 1; each leaves when its tokens are in.
    assert [(s.requests, s.starts) for s in steps[1:-1]] == [((2, 3, 4, 5), (10, 10, 7, 7)), ((3, 5), (11, 8)),
                                                             ((3,), (12,)), ((3,), (13,))]
    assert steps[-1] == Step("rescore", (6, 7, 8, 9), (0, 0, 0, 0), r.sample_lens)
    calls = ROLLOUT.calls(SPEC)
    assert len(calls) == len(steps) and calls[-1][1].batch.query_lens == r.sample_lens


def test_a_windowed_rollout_prefills_in_calls_of_the_window_and_every_request_ends():
    r = Rollout.of(BatchSpec([12, 9], [3, 2]))  # no shared prompts: prompts of 9 and 7, each its sample's request
    ops = r.schedule(chunk=4)
    assert not r.forked and not any(op[0] == "fork" for op in ops if not isinstance(op, Step))
    prefill = [op for op in ops if isinstance(op, Step) and op.phase == "prompt"]
    assert [(s.requests, s.starts, s.lens) for s in prefill] == [((0, 1), (0, 0), (4, 4)), ((0, 1), (4, 4), (4, 3)),
                                                                  ((0,), (8,), (1,))]
    added = {op[1] for op in ops if not isinstance(op, Step) and op[0] == "add"}
    assert added == {op[1] for op in ops if not isinstance(op, Step) and op[0] == "free"}
    windowed = SPEC.replace(batch=BatchSpec([12, 9], [3, 2]), sliding_window=4)
    assert {call.sliding_window for _, call in ROLLOUT.calls(windowed)} == {None, 4}  # full and sliding layers


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
