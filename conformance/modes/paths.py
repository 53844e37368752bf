"""The new tokens brought in over many calls on one cache (CaseSpec.calls "chunks" and "tokens"),
as an engine's scheduler makes them: in chunks of CHUNK_SIZES tokens (one call mixing decode steps
and prefill chunks), or one by one (a decode replay). The calls' rows, put together, are judged
against the references and against one call over the whole batch on a fresh cache."""
from __future__ import annotations

import dataclasses
import math

import torch

from ..calls import Pick, call_spec, sub_case, token_rows
from ..judge import Judgment, Twin, judge_output, judge_twins, with_twins
from ..memory import cache_bytes, call_bytes
from ..spec import ONE_CALL, BatchSpec, CaseSpec
from .base import CallMode, Context

CHUNK_SIZES = (1, 7, 64)  # "chunks": sequence b's i-th chunk takes CHUNK_SIZES[(i + b) % 3] tokens


class Path(CallMode):
    """A case's new tokens in calls of `sizes` tokens a sequence, each call over the same cache."""

    def __init__(self, name: str, sizes: tuple[int, ...], description: str):
        self.name, self.sizes, self.description = name, sizes, description

    def steps(self, batch: BatchSpec) -> list[list[Pick]]:
        """The calls that bring every new token in, each sequence's i-th of sizes[(i + b) % len]
        tokens (each sequence starting at a different size). A sequence leaves once its tokens are in."""
        done, out = [0] * batch.batch_size, []
        while any(d < q for d, q in zip(done, batch.query_lens)):
            step = []
            for b, q in enumerate(batch.query_lens):
                if done[b] < q:
                    n = min(self.sizes[(len(out) + b) % len(self.sizes)], q - done[b])
                    step.append(Pick(b, done[b], n))
                    done[b] += n
            out.append(step)
        return out

    def calls(self, spec: CaseSpec) -> list[tuple[str, CaseSpec]]:
        steps = self.steps(spec.batch)
        return [(f"call {i + 1} of {len(steps)} ({self.name})", call_spec(spec, picks))
                for i, picks in enumerate(steps)]

    def memory(self, spec: CaseSpec, cache_copies: float) -> int:
        return call_bytes(spec, cache_copies) + cache_bytes(spec)  # the one call over the whole batch has a cache of its own

    def run(self, ctx: Context, spec: CaseSpec) -> Judgment:
        prep = ctx.prepared(spec)
        case = ctx.fresh(prep)
        one = spec.replace(calls=ONE_CALL)

        def calls():  # the path, then its twin: the same tokens in one call over a fresh cache
            out, lse = self._path(ctx, case)
            why = ctx.backend.skip_reason(one, ctx.device)
            return out, lse, why, None if why else ctx.call(dataclasses.replace(ctx.fresh(prep), spec=one))[0]

        out, lse, why, whole = ctx.timed(calls)
        judged = judge_output(ctx.backend, case, prep, out, lse)
        if why:
            return with_twins(judged, Judgment(), [f"not compared with one call over the whole batch, which "
                                                   f"{ctx.backend.name} does not take: {why}"])
        twins = [Twin(f"{self.name} against one call", self.name, out, whole)]
        return with_twins(judged, judge_twins(ctx.backend, twins, judged.numbers.tol))

    def _path(self, ctx: Context, case):
        """Every call of the path over the case's cache; their rows put together as one call over the
        whole batch would return them: (out, lse)."""
        out, lse = case.out, None
        for picks in self.steps(case.spec.batch):
            part, part_lse = ctx.call(sub_case(case, picks))
            rows = token_rows(case, picks)
            out[rows] = part
            if part_lse is not None:
                if lse is None:
                    lse = torch.full(out.shape[:2], math.nan, dtype=torch.float32, device=out.device)
                lse[rows] = part_lse.float()
        return out, lse


CHUNKS = Path("chunks", CHUNK_SIZES, f"the new tokens in chunks of {', '.join(map(str, CHUNK_SIZES))} tokens, "
                                     "each a call over the same cache, against one call")
TOKENS = Path("tokens", (1,), "the new tokens one by one (a decode replay), each a call over the same cache, "
                              "against one call")
