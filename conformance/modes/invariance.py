"""Batch invariance (CaseSpec.calls "invariance"): the one call, then each sequence in other batches
over the same cache (reordered, halved, between empty padding sequences) and the same call again;
every sequence's rows must match the first call's."""
from __future__ import annotations

import dataclasses
import math

import torch

from ..calls import Pick, call_spec, sub_case, token_rows
from ..judge import Judgment, Twin, judge_output, judge_twins, with_twins
from ..spec import ONE_CALL, BatchSpec, CaseSpec
from .base import CallMode, Context


def variants(batch: BatchSpec) -> dict[str, list[Pick]]:
    """The same sequences in other batches: reordered, every other one removed, and between empty
    padding sequences (a sequence's rows must not change with its neighbours)."""
    live = [b for b, q in enumerate(batch.query_lens) if q]
    whole = [Pick(b, 0, batch.query_lens[b]) for b in live]
    padded = [Pick(None)]
    for p in whole:
        padded += [p, Pick(None)]
    return {"reordered": whole[::-1], "halved": whole[::2], "padded": padded}


class Invariance(CallMode):
    name = "invariance"
    description = "the one call, then each sequence in other batches over the same cache and the same call again"
    non_causal = True

    def calls(self, spec: CaseSpec) -> list[tuple[str, CaseSpec]]:
        return [("", spec.replace(calls=ONE_CALL))]  # the other batches run where the backend takes them

    def run(self, ctx: Context, spec: CaseSpec) -> Judgment:
        prep = ctx.prepared(spec)
        case = ctx.fresh(prep)

        def calls():  # the one call, each other batch the backend takes, the same call again
            out, lse = ctx.call(case)
            twins, notes = [], []
            for name, picks in variants(spec.batch).items():
                why = ctx.backend.skip_reason(call_spec(spec, picks), ctx.device)
                if why:
                    notes.append(f"{name} batch not run: {why}")
                    continue
                twins.append(Twin(f"{name} batch", "batch", ctx.call(sub_case(case, picks))[0],
                                  out[token_rows(case, picks)]))
            again, _ = ctx.call(dataclasses.replace(case, out=torch.full_like(case.out, math.nan)))
            return out, lse, twins + [Twin("the same call again", "run_to_run", again, out)], notes

        out, lse, twins, notes = ctx.timed(calls)
        judged = judge_output(ctx.backend, case, prep, out, lse)
        return with_twins(judged, judge_twins(ctx.backend, twins, judged.numbers.tol), notes)


INVARIANCE = Invariance()
