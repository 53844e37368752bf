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

from .paged import NULL_BLOCK, PagedBatch
from .spec import BatchSpec, SpecError

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
