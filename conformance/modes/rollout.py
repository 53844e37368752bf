"""Rollout vs rescore (CaseSpec.calls "rollout"): a tiny LM generates over the batch's prompts
through the backend, then rescores its samples through it (conformance/rollout/ says how); its
log-probs are judged against the float64 model's and against each other, its tokens against the
float64 model's choices, its shared prompt blocks must stay untouched."""
from __future__ import annotations

import dataclasses

from ..costs import phase
from ..judge import Judgment, Numbers
from ..memory import cache_bytes, call_bytes
from ..paged import poison_value
from ..result import Category
from ..rollout.drive import Generated, roll_out
from ..rollout.layouts import check_manager
from ..rollout.model import AMPLIFICATION, LAYERS, TinyLM
from ..rollout.schedule import Rollout, Step
from ..rollout.score import Scores, score
from ..spec import ONE_CALL, CaseSpec, SpecError
from ..tolerance import DEFAULT_TOLERANCE, compare
from .base import CallMode, Context


class RollOut(CallMode):
    name = "rollout"
    description = "a tiny LM generating over the batch's prompts through the backend, then rescoring"

    def check(self, spec: CaseSpec) -> None:
        super().check(spec)
        plain_causal = (spec.kind == "mha" and spec.features <= {"causal", "sliding_window"}
                        and spec.kv_dtype == "auto" and spec.kv_layout == "nhd" and spec.logit_std == 1.0
                        and not spec.far_pages)
        if not plain_causal:
            raise SpecError(f"CaseSpec.calls = {spec.calls!r}: a rollout runs a dense model of causal attention, its "
                            f"layers alternating full attention and the sliding window if one is given (no softcap, "
                            f"sinks, empty sequences, fp8 cache, other layout or adversarial variant)")

    def calls(self, spec: CaseSpec) -> list[tuple[str, CaseSpec]]:
        """Every call the rollout makes; with a sliding window, each twice: for the full and the sliding layers."""
        windows = sorted({TinyLM.window_of(spec, layer) for layer in range(LAYERS)}, key=lambda w: w or 0)
        steps = (op for op in Rollout.of(spec.batch).schedule(spec.sliding_window) if isinstance(op, Step))
        return [(f"the rollout's {op.phase} call {i + 1}",
                 spec.replace(batch=op.batch, calls=ONE_CALL, sliding_window=w))
                for i, op in enumerate(steps) for w in windows]

    def memory(self, spec: CaseSpec, cache_copies: float) -> int:
        """Its largest call (one layer at a time), and every layer's cache."""
        largest = max((call for _, call in self.calls(spec)), key=lambda call: call_bytes(call, cache_copies))
        return call_bytes(largest, cache_copies) + (LAYERS - 1) * cache_bytes(largest)

    def run(self, ctx: Context, spec: CaseSpec) -> Judgment:
        check_manager(ctx.manager, spec)  # a manager that cannot run this rollout is the caller's error
        poison = poison_value(spec.cache_dtype, ctx.finite_poison)
        with phase("inputs"):  # the tiny LM around the backend's calls, which time as its own
            got = roll_out(spec, ctx.device, spec.seed(ctx.base_seed), lambda case: ctx.timed(lambda: ctx.call(case))[0],
                           poison, ctx.manager)
        with phase("reference"):
            scores = score(got)
        return judge(ctx.backend, spec, got, scores)


def judge(backend, spec: CaseSpec, got: Generated, ref: Scores) -> Judgment:
    """The rollout's and the rescore's log-probs against the float64 model's (the model's own noise in
    the dtype calibrating the rule) and against each other; the tokens against the float64 model's
    choices; the shared prompt blocks untouched."""
    rule = backend.tolerance or DEFAULT_TOLERANCE
    tolerance = dataclasses.replace(rule, k=rule.k * AMPLIFICATION, reason=f"{rule.reason}; k x {AMPLIFICATION:g} "
                                    "for a model's log-probs (rollout.model.NOISE_FORMS)")
    problems, worst = [], None
    for name, lp in (("rollout", got.logprobs), ("rescore", got.rescored)):
        # the noisier of the model's own forms in the dtype calibrates the rule
        c = max((compare(lp, ref.truth, form, spec.dtype, tolerance) for form in ref.noise_forms), key=lambda c: c.tol)
        worst = c if worst is None or c.ratio > worst.ratio else worst
        if c.nonfinite:
            problems.append((Category.NONFINITE, f"{name} log-probs: {c.nonfinite} NaN/Inf"))
        elif not c.passed:
            problems.append((Category.WRONG_LOGPROBS, f"{name} log-probs: max err {c.err:.3g} > tol {c.tol:.3g} "
                                                      f"(ref_err {c.ref_err:.3g})"))
    tol = worst.tol
    diff = float((got.logprobs - got.rescored).abs().max())
    if not diff <= tol:  # NaN too
        problems.append((Category.ROLLOUT_RESCORE, f"the rescore's log-probs differ from the rollout's by {diff:.3g} "
                                                   f"> tol {tol:.3g}"))
    notes = [f"{len(got.chosen)} tokens; rollout vs rescore max |diff| {diff:.3g}"]
    if ref.divergence:
        sample, step, margin = ref.divergence
        where = f"sample {sample} token {step} is not the float64 model's choice (its margin {margin:.3g}"
        if margin > tol:
            problems.append((Category.TOKENS_DIVERGED, f"{where} > tol {tol:.3g})"))
        else:
            notes.append(f"{where} <= tol {tol:.3g}: a near tie)")
    else:
        notes.append("every token is the float64 model's choice")
    if got.shared_overwritten:
        problems.append((Category.SHARED_BLOCK_WRITE, f"{got.shared_overwritten} slots of shared prompt blocks were "
                                                      "overwritten during the rollout"))
    numbers = Numbers(err=worst.err, ref_err=worst.ref_err, tol=tol, ratio=worst.ratio, rescore_diff=diff)
    return Judgment(tuple(problems), tuple(notes), numbers)


ROLLOUT = RollOut()
