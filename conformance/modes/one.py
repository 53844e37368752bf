"""One call over the whole batch (CaseSpec.calls "one", the default): the call every other mode is
held to."""
from __future__ import annotations

from ..judge import Judgment, judge_output
from ..spec import ONE_CALL, CaseSpec
from .base import CallMode, Context


class OneCall(CallMode):
    name = ONE_CALL
    description = "one call over the whole batch"
    sparse = non_causal = True

    def calls(self, spec: CaseSpec) -> list[tuple[str, CaseSpec]]:
        return [("", spec)]

    def run(self, ctx: Context, spec: CaseSpec) -> Judgment:
        prep = ctx.prepared(spec)
        case = ctx.fresh(prep)
        out, lse = ctx.timed(lambda: ctx.call(case))
        return judge_output(ctx.backend, case, prep, out, lse)


ONE = OneCall()
