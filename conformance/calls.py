"""Many calls on one cache: a call of a case as Picks of its sequences and tokens, made a PagedBatch
over the same paged cache, and the bookkeeping that maps its output rows back to the whole batch
(the call modes of modes/paths.py and modes/invariance.py make their calls of these).

A call is a list of Picks: which sequence of the case, and which of its new tokens. A picked
sequence sees its context and every new token before the picked ones, which earlier calls wrote
into the cache (a chunked prefill, or a decode step, as an engine's scheduler makes them). An
empty Pick is a padding slot: a sequence of no tokens, as CUDA-graph padding makes them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .paged import NULL_BLOCK, PagedBatch, _cumsum
from .spec import ONE_CALL, BatchSpec, CaseSpec

@dataclass(frozen=True)
class Pick:
    seq: int | None  # a sequence of the case; None: an empty padding sequence
    first: int = 0  # its first new token in this call (0: the first new token)
    count: int = 0  # new tokens in this call


def call_spec(spec: CaseSpec, picks: list[Pick]) -> CaseSpec:
    """The spec of one call: its own batch (what a backend's rules judge), in one call."""
    b = spec.batch
    seq_lens = [b.context_lens[p.seq] + p.first + p.count if p.seq is not None else 0 for p in picks]
    return spec.replace(batch=BatchSpec(seq_lens, [p.count for p in picks]), calls=ONE_CALL)


def sub_case(case: PagedBatch, picks: list[Pick]) -> PagedBatch:
    """One call over `case`'s cache (the same tensors: what it writes, later calls read), with its
    own queries, bookkeeping and a fresh NaN-filled output."""
    spec = call_spec(case.spec, picks)
    rows = token_rows(case, picks)
    dev = case.device
    table = torch.full((len(picks), case.block_table.shape[1]), NULL_BLOCK, dtype=case.block_table.dtype, device=dev)
    live = [i for i, p in enumerate(picks) if p.seq is not None]
    table[live] = case.block_table[[picks[i].seq for i in live]]
    i32 = dict(dtype=torch.int32, device=dev)
    batch = spec.batch
    return dataclasses.replace(
        case, spec=spec, **{f: getattr(case, f)[rows] for f in type(case).new_token_fields},
        block_table=table,
        seq_lens=torch.tensor(batch.seq_lens, **i32),
        context_lens=torch.tensor(batch.context_lens, **i32),
        query_start_loc=torch.tensor([0, *_cumsum(batch.query_lens)], **i32),
        max_query_len=max(batch.query_lens), max_seq_len=max(batch.seq_lens),
        out=torch.full((rows.numel(), *case.out.shape[1:]), math.nan, dtype=case.out.dtype, device=dev))


def token_rows(case: PagedBatch, picks: list[Pick]) -> torch.Tensor:
    """The whole batch's rows of the picked tokens, in the call's order."""
    starts = _cumsum([0, *case.spec.batch.query_lens])
    rows = [range(starts[p.seq] + p.first, starts[p.seq] + p.first + p.count) for p in picks if p.seq is not None]
    return torch.tensor([r for span in rows for r in span], dtype=torch.int64, device=case.device)
