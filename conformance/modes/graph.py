"""CUDA-graph replay (CaseSpec.calls "graph"): a call captured once at a batch's shape, then replayed
on other batches of that shape, as engines run their decode steps.

A captured call holds the addresses of one case's tensors (the static case) and whatever its adapter
worked out on the host while it was captured. Before each replay the harness writes the next batch
into those tensors in place, padded to the captured shape (load): sequence slots past the batch's
are empty (length 0), token rows past its tokens are padding rows of poison whose output nobody
reads, table columns and blocks past its own are the null block and poison. Then the adapter redoes
its per-batch host work (the `plan` of Backend.prepare_graph: FlashInfer's plan into the buffers the
graph reads) and the graph runs. Only the replays are judged, each against its own batch's truth:
right numbers mean the call read the batch from the tensors, not what the capture kept, and the
padding rows did not reach the real ones.

On a CPU there are no graphs: the prepared call is called again for each replay, which checks the
same contract but for host work done inside the call itself (a CUDA capture bakes that in, too).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..judge import Judgment, judge_output
from ..memory import call_bytes
from ..paged import NULL_BLOCK, PagedBatch
from ..prepared import Prepared
from ..registry import Backend
from ..spec import ONE_CALL, BatchSpec, CaseSpec, SpecError
from .base import CallMode, Context, unpack

PAD_SLOT = -1  # a padding row's slot (vLLM's PAD_SLOT_ID): no cache write
# What a tensor holds past a replay's own part: the null block, no slot, length 0; floats: poison
# (the output NaN, as every run's output starts).
_PADDING = {"block_table": NULL_BLOCK, "slot_mapping": PAD_SLOT, "out": math.nan}


def replays(batch: BatchSpec) -> dict[str, BatchSpec]:
    """The batches a graph captured at `batch`'s shape is replayed on: its lengths in reverse order
    (every slot a new length, new pages and data), and its first half with the other slots empty
    (padding: fewer tokens than captured)."""
    half = (batch.batch_size + 1) // 2
    pad = (0,) * (batch.batch_size - half)
    return {"reversed": BatchSpec(batch.seq_lens[::-1], batch.query_lens[::-1]),
            "padded": BatchSpec(batch.seq_lens[:half] + pad, batch.query_lens[:half] + pad)}


def load(static: PagedBatch, case: PagedBatch) -> PagedBatch:
    """Write `case` into `static`'s tensors in place, padded to their shapes, and return `case`
    made of views of them: what the replay reads and writes, and what the judge then looks at.
    Python values (max_query_len, max_seq_len, scales) stay the captured batch's: bounds of it."""
    views = {}
    for field in dataclasses.fields(case):
        new, held = getattr(case, field.name), getattr(static, field.name)
        if not isinstance(new, torch.Tensor):
            continue
        if new.dim() != held.dim() or any(n > h for n, h in zip(new.shape, held.shape)):
            raise SpecError(f"graph replay: {field.name} {tuple(new.shape)} does not fit the captured "
                            f"{tuple(held.shape)}")
        held.fill_(_PADDING.get(field.name, static.poison if held.is_floating_point() else 0))
        views[field.name] = held[tuple(slice(0, n) for n in new.shape)]
        views[field.name].copy_(new)
    return dataclasses.replace(case, **views)


class Captured:
    """A backend's call on `static`, captured in a CUDA graph (on a CPU: the prepared call, called
    again). replay() runs the adapter's plan, then the call, and returns what the call returned."""

    def __init__(self, backend, static: PagedBatch):
        self.call, self.plan = backend.prepare_graph(static)
        self.plan()
        self.graph = None
        if static.device.type != "cuda":
            self.call()  # the first call, as on CUDA
            return
        side = torch.cuda.Stream(static.device)  # first launches compile and allocate outside the capture
        side.wait_stream(torch.cuda.current_stream(static.device))
        with torch.cuda.stream(side):
            self.call()
        torch.cuda.current_stream(static.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.returned = self.call()

    def replay(self):
        self.plan()
        if self.graph is None:
            return self.call()
        self.graph.replay()
        return self.returned


class Graph(CallMode):
    name = "graph"
    description = "the call captured in a CUDA graph on the batch, then replayed on other batches of its shape"

    def check(self, spec: CaseSpec) -> None:
        super().check(spec)
        if spec.batch.shared_prefix_lens or spec.batch.batch_size < 2:
            raise SpecError(f"CaseSpec.batch = {spec.batch!r}: a graph case's batch needs 2 sequences or more and "
                            f"no shared prompts (its replays reverse and halve it)")

    def calls(self, spec: CaseSpec) -> list[tuple[str, CaseSpec]]:
        """Each batch the graph meets, as it reaches the backend (padding included)."""
        captured = [("the captured batch", spec.replace(calls=ONE_CALL))]
        return captured + [(f"the {name} replay", spec.replace(batch=batch, calls=ONE_CALL))
                           for name, batch in replays(spec.batch).items()]

    def refusal(self, backend: Backend, spec: CaseSpec, device: torch.device) -> str | None:
        for which, call in self.calls(spec):
            why = backend.skip_reason(call, device, captured=True)
            if why:
                return f"{which}: {why}"
        return None

    def memory(self, spec: CaseSpec, cache_copies: float) -> int:
        return 3 * call_bytes(spec, cache_copies)  # the captured case and its two replays, each prepared

    def run(self, ctx: Context, spec: CaseSpec) -> Judgment:
        """The call captured on the case's batch, replayed on the other batches of its shape, each
        replay judged against its own batch's truth before the next one overwrites it; the worst
        replay's numbers are the case's."""
        backend = ctx.backend
        static = ctx.fresh(ctx.prepared(spec))
        preps = {name: _replay_prepared(ctx, spec.replace(batch=batch, calls=ONE_CALL), static)
                 for name, batch in replays(spec.batch).items()}

        def capture():
            backend.write_cache(static)
            return Captured(backend, static)

        def replay(case):
            backend.write_cache(case)
            returned = graph.replay()
            ctx.sync()
            return unpack(returned, static, backend)

        graph = ctx.timed(capture)
        problems, worst = [], None
        for name, prep in preps.items():
            case = load(static, ctx.fresh(prep))
            returned = ctx.timed(lambda: replay(case))  # noqa: B023 - called at once
            rows = slice(0, case.out.shape[0])  # past them: padding rows
            out, lse = returned[0][rows], None if returned[1] is None else returned[1][rows]
            judged = judge_output(backend, case, prep, out, lse)
            problems += [(category, f"replay on the {name} batch: {text}") for category, text in judged.problems]
            if worst is None or judged.numbers.ratio >= worst.ratio:
                worst = judged.numbers
        how = "captured in a CUDA graph" if ctx.device.type == "cuda" else "no CUDA graph on a CPU: the prepared call"
        return Judgment(tuple(problems), (f"{how}, replayed on the {' and '.join(preps)} batches",), worst)


def _replay_prepared(ctx: Context, spec: CaseSpec, static: PagedBatch) -> Prepared:
    """A replay's inputs and references, its fp8 cache with the captured batch's scales (an engine's
    stay fixed; the captured call holds them)."""
    prep = ctx.prepared(spec)
    scales = {f.name: getattr(static, f.name) for f in dataclasses.fields(prep.inputs) if f.name.endswith("_scale")}
    if all(getattr(prep.inputs, name) == value for name, value in scales.items()):
        return prep
    return Prepared(dataclasses.replace(prep.inputs, **scales))


GRAPH = Graph()
