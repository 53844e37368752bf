"""Rollout vs rescore (CaseSpec.calls "rollout"): a tiny causal LM whose attention runs through a
backend over a paged cache, as an RL framework uses an inference engine.

The model: seeded weights (no downloads), a vocabulary of VOCAB tokens, LAYERS layers of RMSNorm,
attention with rotary positions over the case's heads, and a residual; then RMSNorm and the
unembedding. A case's batch gives the prompts and the samples: P prompts of shared_prefix_lens
tokens (without sharing, each sequence's context is its own prompt) and, per sample, seq_len -
prompt tokens to generate. Through the backend:

- rollout: one prefill call per layer over the P prompts; each prompt is then forked into its G
  samples, which share its blocks (a partly filled last one is copied when a sample first writes
  into it: copy-on-write); then decode calls, one token per sample, each sample leaving the batch
  (and freeing its blocks) when its tokens are in. The tokens are the argmax of the
  log-probabilities plus seeded Gumbel noise (sampling with a fixed draw: the G samples of a
  prompt differ, and a run is reproducible); each token's log-probability is kept.
- rescore: one prefill call per layer over every sample's prompt + generated tokens, as new
  requests in the blocks the rollout freed, giving the same tokens' log-probabilities again.

A KV-cache manager (managers.py; the suite's own unless the runner is given another) hands out
every block, so a manager runs end to end here: a manager bug shows as wrong log-probabilities.

The truth is the same model in float64 with the reference's attention (explicit masks, logical
K/V), teacher-forced on the generated tokens; the noise that calibrates the tolerance is the model
in the case's dtype with the low-precision reference attention. Both log-probability sets are
judged against the truth with the pass rule, and against each other: a rollout that the rescore
does not reproduce is what breaks RL training (the policy ratio of importance sampling). The tokens
are checked against the float64 model's own choices up to the first difference, which fails unless
the float64 choice was a near tie (margin within the tolerance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .managers import RefCountedBlocks
from .paged import Case, _allocate_cache, bits, poison_value
from .reference import attend, precision_of
from .spec import BatchSpec, CaseSpec

VOCAB = 256
LAYERS = 2
D_MODEL = 256
UNEMBED_GAIN = 4.0  # logits of std about 4: log-probabilities spread over a few units, some near ties


@dataclass(frozen=True)
class Rollout:
    """What a case's batch asks of the rollout: the prompts, and per sample its prompt and the
    number of tokens it generates."""

    prompt_lens: tuple[int, ...]
    prompt_of: tuple[int, ...]  # per sample
    generated: tuple[int, ...]  # per sample, >= 1

    @classmethod
    def of(cls, batch: BatchSpec) -> "Rollout":
        live = [i for i, s in enumerate(batch.seq_lens) if s]
        if batch.shared_prefix_lens:
            prompts = batch.shared_prefix_lens
            prompt_of = tuple(i // batch.group_size for i in live)
        else:
            prompts = tuple(batch.context_lens[i] or 1 for i in live)
            prompt_of = tuple(range(len(live)))
        generated = tuple(max(1, batch.seq_lens[i] - prompts[p]) for i, p in zip(live, prompt_of))
        return cls(prompts, prompt_of, generated)

    @property
    def sample_lens(self) -> tuple[int, ...]:
        """The tokens the model reads for each sample: its prompt and every generated token but the
        last (the rescore's sequences)."""
        return tuple(self.prompt_lens[p] + n - 1 for p, n in zip(self.prompt_of, self.generated))

    def calls(self, spec: CaseSpec) -> list[CaseSpec]:
        """The kinds of call the rollout makes (what a backend's rules must accept): the prompts'
        prefill, the first decode step, and the rescore."""
        decode = [self.prompt_lens[p] + 1 for p in self.prompt_of]
        return [spec.replace(batch=BatchSpec(lens, q), calls="one") for lens, q in
                ((self.prompt_lens, self.prompt_lens), (decode, [1] * len(decode)),
                 (self.sample_lens, self.sample_lens))]


class TinyLM:
    """The model's weights, drawn in float64 from a seed; forward() runs it in a given precision."""

    def __init__(self, spec: CaseSpec, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        h = spec.heads

        def w(*shape, std):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float64) * std

        self.spec = spec
        self.embed = w(VOCAB, D_MODEL, std=1.0)
        self.layers = [(w(D_MODEL, h.num_q_heads * h.head_dim, std=D_MODEL ** -0.5),
                        w(D_MODEL, h.num_kv_heads * h.head_dim, std=D_MODEL ** -0.5),
                        w(D_MODEL, h.num_kv_heads * h.head_dim, std=D_MODEL ** -0.5),
                        w(h.num_q_heads * h.head_dim, D_MODEL, std=(h.num_q_heads * h.head_dim) ** -0.5))
                       for _ in range(LAYERS)]
        self.unembed = w(D_MODEL, VOCAB, std=UNEMBED_GAIN * D_MODEL ** -0.5)
        self._cast: dict[torch.dtype, tuple] = {}

    def _weights(self, dtype: torch.dtype) -> tuple:
        """(embed, layers, unembed) in `dtype`, cast once (a rollout runs the model every decode step)."""
        if dtype not in self._cast:
            self._cast[dtype] = (self.embed.to(dtype), [tuple(w.to(dtype) for w in ws) for ws in self.layers],
                                 self.unembed.to(dtype))
        return self._cast[dtype]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention, dtype: torch.dtype) -> torch.Tensor:
        """Log-probabilities [T, VOCAB] (float64) of the next token after each of `tokens` (packed),
        at `positions`. attention(layer, q, k, v) -> out [T, Hq, D] attends the new tokens' q over
        their sequences (k, v: the new tokens' keys and values, to be kept for later calls)."""
        h = self.spec.heads
        embed, layers, unembed = self._weights(dtype)
        x = embed[tokens]
        for layer, (wq, wk, wv, wo) in enumerate(layers):
            xn = _rms_norm(x)
            q = _rope(xn @ wq, positions, h.num_q_heads)
            k = _rope(xn @ wk, positions, h.num_kv_heads)
            v = (xn @ wv).view(-1, h.num_kv_heads, h.head_dim)
            out = attention(layer, q, k, v)
            x = x + out.reshape(len(tokens), -1).to(dtype) @ wo
        logits = _rms_norm(x) @ unembed
        return torch.log_softmax(logits.double(), -1)


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotary positions (the half-split form, base 10000) on [T, heads * D] -> [T, heads, D]."""
    x = x.view(x.shape[0], heads, -1)
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    angle = positions.double()[:, None] * freq[None, :]
    cos, sin = (f(angle).to(x.dtype)[:, None, :] for f in (torch.cos, torch.sin))
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


# The model's own noise in a dtype: the same model in the dtype with the reference attention in two
# legitimate forms (as a kernel in the dtype computes it, and exact then rounded); the noisier one
# calibrates the rule. Attention's last-bit differences grow through the layers and the vocabulary's
# softmax, so legitimate forms land far apart: on the CPU profile's rollout in bf16, over 12 seeds, the
# largest log-prob error of torch SDPA was up to 2.4x that of the noisier form (4.3x the other).
# The rule's k is multiplied by AMPLIFICATION for the model's log-probs.
NOISE_FORMS = ("lowp", "float64")
AMPLIFICATION = 2.0


def reference_logprobs(lm: TinyLM, seqs: list[torch.Tensor], dtype: torch.dtype, precision: str) -> torch.Tensor:
    """The model in `dtype`, teacher-forced on whole sequences, attention by the reference
    (explicit causal masks over the logical K/V) in `precision` ("float64" or "lowp", rounded to
    the dtype). The model in float64 with float64 attention is the truth."""
    spec = lm.spec
    acc, rnd = precision_of(spec, precision)
    lens = [len(s) for s in seqs]
    one = spec.replace(batch=BatchSpec(lens, lens))
    tokens = torch.cat(seqs)
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=tokens.device)
    positions = torch.cat([torch.arange(n, device=tokens.device) for n in lens])

    def attention(layer, q, k, v):
        keys = lambda rows: (rnd(k[rows].to(acc)), rnd(v[rows].to(acc)))  # noqa: E731
        out, _ = attend(one, rnd(q.to(acc)), keys, starts, spec.heads.num_kv_heads, spec.heads.head_dim, rnd)
        return out.to(dtype)

    return lm.forward(tokens, positions, attention, dtype)


class PagedModel:
    """The model's caches for one backend, one paged K/V cache per layer, whose blocks a KV-cache
    manager (managers.py) hands out: its block b is cache block pages[b], a shuffled pick past the
    null block 0, so tables are never contiguous whatever order the manager takes blocks in."""

    def __init__(self, backend, lm: TinyLM, manager, device: torch.device, gen: torch.Generator):
        spec = lm.spec
        self.backend, self.lm, self.spec, self.manager = backend, lm, spec, manager
        self.poison = poison_value(spec.cache_dtype, backend.finite_poison)
        self.caches = [_allocate_cache(spec, 1 + manager.num_blocks, self.poison, device)[:2] for _ in range(LAYERS)]
        self.pages = (torch.randperm(manager.num_blocks, generator=gen, device=device) + 1).tolist()

    def allocate(self, request: int, n: int) -> None:
        """Room for n more tokens of the request; the block copies the manager asks for, made."""
        for src, dst in self.manager.allocate(request, n):
            for k, v in self.caches:
                k[self.pages[dst]], v[self.pages[dst]] = k[self.pages[src]], v[self.pages[src]]

    def table(self, request: int) -> list[int]:
        return [self.pages[b] for b in self.manager.block_table(request)]

    def step(self, tokens, positions, requests: list[int], seq_lens: list[int], query_lens: list[int], call):
        """One call per layer: the new tokens (packed) of these requests, whose tables and lengths the
        manager holds. call(backend, case) runs the backend (the runner's checked call)."""
        spec, bs, dev = self.spec, self.spec.block_size, tokens.device
        one = spec.replace(batch=BatchSpec(seq_lens, query_lens), calls="one")
        tables = [self.table(r) for r in requests]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        seq = torch.repeat_interleave(torch.arange(len(tables), device=dev), torch.tensor(query_lens, device=dev))
        slots = table[seq, positions // bs].to(torch.int64) * bs + positions % bs
        i32 = dict(dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], **i32)
        h = spec.heads

        def attention(layer, q, k, v):
            k_cache, v_cache = self.caches[layer]
            case = Case(spec=one, q=q.contiguous(), block_table=table, slot_mapping=slots,
                        seq_lens=torch.tensor(seq_lens, **i32),
                        context_lens=torch.tensor(one.batch.context_lens, **i32),
                        query_start_loc=qsl, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
                        out=torch.full((len(tokens), h.num_q_heads, h.head_dim), math.nan, dtype=spec.dtype,
                                       device=dev),
                        poison=self.poison, k_new=k.contiguous(), v_new=v.contiguous(), k_cache=k_cache,
                        v_cache=v_cache)
            return call(self.backend, case)[0]

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


def roll_out(backend, spec: CaseSpec, device: torch.device, seed: int, call, manager=RefCountedBlocks) -> Generated:
    """Generate through `backend` and rescore through it, the blocks handed out by a `manager` (a
    KVCacheManager class). call(backend, case) -> (out, lse) runs one checked call."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lm = TinyLM(spec, device, seed)
    r = Rollout.of(spec.batch)
    bs = spec.block_size
    prompts = [torch.randint(VOCAB, (n,), generator=gen, device=device) for n in r.prompt_lens]
    noise = gumbel(len(r.prompt_of), max(r.generated), device, gen)
    seq_lens = [r.prompt_lens[p] + n - 1 for p, n in zip(r.prompt_of, r.generated)]  # what the rescore reads
    # Requests: the prompts 0..P-1, the samples P.., the rescore's P + S..
    prompt_ids, sample_ids = range(len(prompts)), range(len(prompts), len(prompts) + len(r.prompt_of))
    rescore_ids = [len(prompts) + len(r.prompt_of) + s for s in range(len(r.prompt_of))]
    # The most blocks held at once: the prompts and each sample's own (its copy of a partial prompt
    # block, its new tokens) during the rollout, or every sample whole in the rescore.
    own = [math.ceil((r.prompt_lens[p] % bs + n) / bs) for p, n in zip(r.prompt_of, r.generated)]
    need = max(sum(math.ceil(n / bs) for n in r.prompt_lens) + sum(own), sum(math.ceil(n / bs) for n in seq_lens))
    model = PagedModel(backend, lm, manager(need, bs), device, gen)

    # The rollout: the prompts' prefill; each prompt forked into its samples (its blocks shared, a
    # partly filled last one copied at a sample's first write) and ended; then decode, each sample
    # ending when its tokens are in.
    for p, n in zip(prompt_ids, r.prompt_lens):
        model.allocate(p, n)
    lp = model.step(torch.cat(prompts), torch.cat([torch.arange(n, device=device) for n in r.prompt_lens]),
                    list(prompt_ids), list(r.prompt_lens), list(r.prompt_lens), call)
    last_rows = torch.tensor(r.prompt_lens, device=device).cumsum(0) - 1
    shared = [b for p in prompt_ids for b in model.table(p)[:r.prompt_lens[p] // bs]]
    before = [(k[shared].clone(), v[shared].clone()) for k, v in model.caches]
    for s, p in zip(sample_ids, r.prompt_of):
        model.manager.fork(p, s)
    for p in prompt_ids:
        model.manager.free(p)
    first = lp[last_rows[list(r.prompt_of)]]  # [S, V]: each sample's first token, from its prompt's last row
    tokens = [[int(t)] for t in torch.argmax(first + noise[:, 0], -1)]
    rollout = [[float(first[s, tokens[s][0]])] for s in range(len(tokens))]
    for step in range(1, max(r.generated) + 1):
        for s, n in enumerate(r.generated):
            if n == step:  # its last token is chosen: it leaves, and its blocks go back
                model.manager.free(sample_ids[s])
        live = [s for s, n in enumerate(r.generated) if n > step]
        if not live:
            break
        pos = [r.prompt_lens[r.prompt_of[s]] + step - 1 for s in live]  # where the last token goes
        for s in live:
            model.allocate(sample_ids[s], 1)
        lp = model.step(torch.tensor([tokens[s][-1] for s in live], device=device), torch.tensor(pos, device=device),
                        [sample_ids[s] for s in live], [p + 1 for p in pos], [1] * len(live), call)
        picks = torch.argmax(lp + noise[live, step], -1).tolist()
        for i, s in enumerate(live):
            tokens[s].append(picks[i])
            rollout[s].append(float(lp[i, picks[i]]))
    shared_overwritten = sum(int((bits(now[shared]) != bits(was)).reshape(len(shared), bs, -1).any(-1).sum())
                             for layer, old in zip(model.caches, before) for now, was in zip(layer, old))

    # The rescore: new requests, every sample's prompt and generated tokens (but the last) in one
    # prefill, in blocks the rollout's requests held before (stale data that must not be read).
    seqs = [torch.cat([prompts[p], torch.tensor(t[:-1], dtype=torch.int64, device=device)])
            for p, t in zip(r.prompt_of, tokens)]
    for request, n in zip(rescore_ids, seq_lens):
        model.allocate(request, n)
    lp = model.step(torch.cat(seqs), torch.cat([torch.arange(n, device=device) for n in seq_lens]),
                    rescore_ids, seq_lens, seq_lens, call)
    del model
    # Row of each generated token's prediction: its sample's prompt's last position on.
    starts = [0, *torch.tensor(seq_lens).cumsum(0).tolist()]
    rows = torch.tensor([starts[s] + r.prompt_lens[p] - 1 + i for s, (p, t) in enumerate(zip(r.prompt_of, tokens))
                         for i in range(len(t))], device=device)
    chosen = torch.tensor([x for t in tokens for x in t], device=device)
    return Generated(lm=lm, rollout=r, seqs=seqs, rows=rows, chosen=chosen, noise=noise,
                     logprobs=torch.tensor([x for lps in rollout for x in lps], dtype=torch.float64, device=device),
                     rescored=lp[rows, chosen], shared_overwritten=shared_overwritten)


def score(g: Generated) -> Scores:
    """The generated tokens' log-probabilities by the reference model, and its own choices."""
    every = reference_logprobs(g.lm, g.seqs, torch.float64, "float64")[g.rows]
    picked = (torch.arange(len(g.rows), device=g.rows.device), g.chosen)
    forms = [reference_logprobs(g.lm, g.seqs, g.lm.spec.dtype, form)[g.rows][picked] for form in NOISE_FORMS]
    return Scores(truth=every[picked], noise_forms=forms,
                  divergence=_first_divergence(every, g.chosen, g.noise, g.rollout.generated))


def _first_divergence(truth: torch.Tensor, chosen: torch.Tensor, noise: torch.Tensor, generated) -> tuple | None:
    """The first generated token (sample by sample, step by step) that the float64 model, on the same
    prefix and noise, would not have chosen; later tokens of that sample follow from it."""
    row = 0
    for s, n in enumerate(generated):
        perturbed = truth[row:row + n] + noise[s, :n]  # [n, V]
        best = perturbed.argmax(-1)
        for i in range(n):
            if int(best[i]) != int(chosen[row + i]):
                return s, i, float(perturbed[i, best[i]] - perturbed[i, chosen[row + i]])
        row += n
    return None
