"""The rollout and its rescore through a backend (Rollout.schedule), one call per layer and step,
over the blocks a KV-cache manager hands out."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..managers import RefCountedBlocks
from ..paged import NULL_BLOCK, Case, bits
from ..spec import ONE_CALL, CaseSpec
from .layouts import _Layout, layout
from .model import VOCAB, TinyLM
from .schedule import Rollout, Step


# Runs the backend on one call's Case (its cache write and attention) and returns the output.
Call = Callable[[Case], torch.Tensor]


class PagedModel:
    """The model's caches, laid out by a manager's blocks (_Layout) and poisoned with `poison`."""

    def __init__(self, lm: TinyLM, blocks: _Layout, device: torch.device, gen: torch.Generator, poison: float):
        self.lm, self.spec, self.blocks, self.poison = lm, lm.spec, blocks, poison
        blocks.build(poison, device, gen)

    def step(self, op: Step, tokens: torch.Tensor, call: Call) -> torch.Tensor:
        """One call per layer: the step's tokens (packed), whose tables and lengths the manager holds."""
        spec, dev = self.spec, tokens.device
        positions = torch.cat([torch.arange(s, s + n, device=dev) for s, n in zip(op.starts, op.lens)])
        seq = torch.repeat_interleave(torch.arange(len(op.lens), device=dev), torch.tensor(op.lens, device=dev))
        i32 = dict(dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, *torch.tensor(op.lens).cumsum(0).tolist()], **i32)
        h = spec.heads

        def attention(layer, q, k, v):
            one = spec.replace(batch=op.batch, calls=ONE_CALL, block_size=self.blocks.block_sizes[layer],
                               sliding_window=TinyLM.window_of(spec, layer))
            bs = one.block_size
            tables = [self.blocks.table(r, layer) for r in op.requests]
            width = max(len(t) for t in tables)
            table = torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in tables], **i32)
            k_cache, v_cache = self.blocks.caches[layer]
            case = Case(spec=one, q=q.contiguous(), block_table=table,
                        slot_mapping=table[seq, positions // bs].to(torch.int64) * bs + positions % bs,
                        seq_lens=torch.tensor(one.batch.seq_lens, **i32),
                        context_lens=torch.tensor(one.batch.context_lens, **i32),
                        query_start_loc=qsl, max_query_len=max(op.lens), max_seq_len=max(one.batch.seq_lens),
                        out=torch.full((len(tokens), h.num_q_heads, h.head_dim), math.nan, dtype=spec.dtype,
                                       device=dev),
                        poison=self.poison, k_new=k.contiguous(), v_new=v.contiguous(), k_cache=k_cache,
                        v_cache=v_cache)
            return call(case)

        return self.lm.forward(tokens, positions, attention, spec.dtype)


def gumbel(n_samples: int, steps: int, device, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n_samples, steps, VOCAB, generator=gen, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))


@dataclass
class Generated:
    """What the backend produced: the samples' tokens and their log-probabilities (flat, sample
    after sample) as generated and as rescored, and what the reference model needs to score them."""

    lm: TinyLM
    rollout: Rollout
    seqs: list[torch.Tensor]  # per sample, the tokens the model read (prompt, generated but the last)
    rows: torch.Tensor  # the row of each generated token's prediction in the packed seqs
    chosen: torch.Tensor  # the generated tokens
    noise: torch.Tensor  # [samples, steps, VOCAB] the Gumbel draws
    logprobs: torch.Tensor  # as generated, token by token
    rescored: torch.Tensor  # by one prefill over the whole samples
    shared_overwritten: int  # slots of shared prompt blocks whose bits the rollout changed


@dataclass
class Scores:
    """The same tokens scored by the reference model."""

    truth: torch.Tensor  # float64 model and attention
    noise_forms: list[torch.Tensor]  # the model in the dtype, with the reference attention in each of NOISE_FORMS
    # The first generated token the float64 model would not have chosen: (sample, step, the float64
    # margin of its own choice over the one made), or None.
    divergence: tuple[int, int, float] | None


def roll_out(spec: CaseSpec, device: torch.device, seed: int, call: Call, poison: float,
             manager: type = RefCountedBlocks) -> Generated:
    """Generate and rescore (Rollout.schedule), every attention by `call`, the blocks handed out by a
    `manager` (a class of one of the protocols of managers.py), unused slots holding `poison`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lm = TinyLM(spec, device, seed)
    r = Rollout.of(spec.batch)
    prompts = [torch.randint(VOCAB, (n,), generator=gen, device=device) for n in r.prompt_lens]
    noise = gumbel(len(r.prompt_of), max(r.generated), device, gen)
    schedule = r.schedule(spec.sliding_window)
    model = PagedModel(lm, layout(manager, spec, schedule), device, gen, poison)
    blocks, bs = model.blocks, spec.block_size
    prompt_ids, sample_ids, rescore_ids = r.requests()
    sample_of = {request: s for s, request in enumerate(sample_ids)}
    rescore_of = {request: s for s, request in enumerate(rescore_ids)}
    last: dict[int, torch.Tensor] = {}  # per prompt, the log-probs after its last token
    tokens: list[list[int]] = []  # per sample, its generated tokens
    rollout: list[list[float]] = []  # ... and their log-probs
    rescored: dict[int, list[torch.Tensor]] = {q: [] for q in rescore_ids}
    seqs, shared, before, shared_overwritten = None, [], [], 0

    for op in schedule:
        if not isinstance(op, Step):
            if op[0] == "fork" and not before:  # the prompts' full blocks as the prefill left them, to be kept
                shared = [b for p in prompt_ids for b in blocks.table(p, 0)[:r.prompt_lens[p] // bs]]
                before = [(k[shared].clone(), v[shared].clone()) for k, v in blocks.caches]
            elif op[:2] == ("add", rescore_ids[0]) and shared:  # the rollout is over: were they kept?
                shared_overwritten = sum(
                    int((bits(now[shared]) != bits(was)).reshape(len(shared), bs, -1).any(-1).sum())
                    for layer, old in zip(blocks.caches, before) for now, was in zip(layer, old))
            getattr(blocks, op[0])(*op[1:])
            continue
        parts = list(zip(op.requests, op.starts, op.lens))
        if op.phase == "prompt":
            lp = model.step(op, torch.cat([prompts[p][s:s + n] for p, s, n in parts]), call)
            ends = torch.tensor(op.lens).cumsum(0) - 1
            last.update({p: lp[int(end)] for (p, s, n), end in zip(parts, ends) if s + n == r.prompt_lens[p]})
            if len(last) == len(prompt_ids):  # each sample's first token, from its prompt's last row
                first = torch.stack([last[p] for p in r.prompt_of])  # [S, V]
                tokens = [[int(t)] for t in torch.argmax(first + noise[:, 0], -1)]
                rollout = [[float(first[s, tokens[s][0]])] for s in range(len(tokens))]
        elif op.phase == "decode":
            live = [sample_of[q] for q in op.requests]
            lp = model.step(op, torch.tensor([tokens[s][-1] for s in live], device=device), call)
            picks = torch.argmax(lp + noise[live, len(tokens[live[0]])], -1).tolist()
            for i, s in enumerate(live):
                tokens[s].append(picks[i])
                rollout[s].append(float(lp[i, picks[i]]))
        else:
            if seqs is None:  # the rollout is done: each sample's prompt and its tokens but the last
                seqs = [torch.cat([prompts[p], torch.tensor(t[:-1], dtype=torch.int64, device=device)])
                        for p, t in zip(r.prompt_of, tokens)]
            lp = model.step(op, torch.cat([seqs[rescore_of[q]][s:s + n] for q, s, n in parts]), call)
            for (q, _, _), rows in zip(parts, lp.split(list(op.lens))):
                rescored[q].append(rows)
    del model
    lp = torch.cat([torch.cat(rescored[q]) for q in rescore_ids])
    # Row of each generated token's prediction: its sample's prompt's last position on.
    starts = [0, *torch.tensor(r.sample_lens).cumsum(0).tolist()]
    rows = torch.tensor([starts[s] + r.prompt_lens[p] - 1 + i for s, (p, t) in enumerate(zip(r.prompt_of, tokens))
                         for i in range(len(t))], device=device)
    chosen = torch.tensor([x for t in tokens for x in t], device=device)
    return Generated(lm=lm, rollout=r, seqs=seqs, rows=rows, chosen=chosen, noise=noise,
                     logprobs=torch.tensor([x for lps in rollout for x in lps], dtype=torch.float64, device=device),
                     rescored=lp[rows, chosen], shared_overwritten=shared_overwritten)
