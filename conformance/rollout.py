"""Rollout vs rescore (CaseSpec.calls "rollout"): a tiny causal LM whose attention runs through a
backend over a paged cache, as an RL framework uses an inference engine.

The model: seeded weights (no downloads), a vocabulary of VOCAB tokens, LAYERS layers of RMSNorm,
attention with rotary positions over the case's heads, and a residual; then RMSNorm and the
unembedding. With a sliding window, the layers alternate full attention and the window (a hybrid
model, as Gemma 2). A case's batch gives the prompts and the samples: P prompts of
shared_prefix_lens tokens (without sharing, each sequence's context is its own prompt) and, per
sample, seq_len - prompt tokens to generate. Through the backend (Rollout.schedule):

- rollout: one prefill call per layer over the P prompts (with a window, in calls of `window`
  tokens, as an engine whose sliding layers keep ring buffers must); each shared prompt is then
  forked into its G samples, which share its blocks (a partly filled last one is copied when a
  sample first writes into it: copy-on-write); then decode calls, one token per sample, each sample
  leaving the batch (and freeing its blocks) when its tokens are in. The tokens are the argmax of
  the log-probabilities plus seeded Gumbel noise (sampling with a fixed draw: the G samples of a
  prompt differ, and a run is reproducible); each token's log-probability is kept.
- rescore: prefill calls over every sample's prompt + generated tokens, as new requests in the
  blocks the rollout freed, giving the same tokens' log-probabilities again.

A KV-cache manager (managers.py; the suite's own unless the runner is given another) hands out
every block, so a manager runs end to end here: a manager bug shows as wrong log-probabilities.
A paged manager (KVCacheManager) holds every layer's blocks; a HybridManager the full and the
sliding layers' tables; a RingBufferManager the sliding layers' slots (the full layers' blocks
are then the suite's).

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

from .managers import (KINDS_OF_LAYER, HybridBlocks, HybridManager, KVCacheManager, RefCountedBlocks, RingBufferManager,
                       RingSlots)
from .paged import NULL_BLOCK, Case, _allocate_cache, bits, poison_value
from .reference import attend, precision_of
from .spec import BatchSpec, CaseSpec

VOCAB = 256
LAYERS = 2
D_MODEL = 256
UNEMBED_GAIN = 4.0  # logits of std about 4: log-probabilities spread over a few units, some near ties


@dataclass(frozen=True)
class Step:
    """One call per layer: the tokens [start, start + n) of each of `requests`."""

    phase: str  # "prompt", "decode" or "rescore"
    requests: tuple[int, ...]
    starts: tuple[int, ...]
    lens: tuple[int, ...]

    @property
    def batch(self) -> BatchSpec:
        return BatchSpec([s + n for s, n in zip(self.starts, self.lens)], list(self.lens))


@dataclass(frozen=True)
class Rollout:
    """What a case's batch asks of the rollout: the prompts, and per sample its prompt and the
    number of tokens it generates. With shared prompts (group_size > 1) the samples fork their
    prompt's request; without, each sample is its prompt's request."""

    prompt_lens: tuple[int, ...]
    prompt_of: tuple[int, ...]  # per sample
    generated: tuple[int, ...]  # per sample, >= 1
    forked: bool

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
        return cls(prompts, prompt_of, generated, bool(batch.shared_prefix_lens))

    @property
    def sample_lens(self) -> tuple[int, ...]:
        """The tokens the model reads for each sample: its prompt and every generated token but the
        last (the rescore's sequences)."""
        return tuple(self.prompt_lens[p] + n - 1 for p, n in zip(self.prompt_of, self.generated))

    def requests(self) -> tuple[list[int], list[int], list[int]]:
        """The request ids of the prompts, the samples and the rescore's sequences."""
        n_prompts, n_samples = len(self.prompt_lens), len(self.prompt_of)
        samples = list(range(n_prompts, n_prompts + n_samples)) if self.forked else list(range(n_samples))
        return list(range(n_prompts)), samples, list(range(n_prompts + n_samples, n_prompts + 2 * n_samples))

    def schedule(self, chunk: int | None = None) -> list:
        """The rollout as an engine runs it, in order: Steps and the manager's operations ("add",
        request, n) (room for n more tokens), ("fork", parent, child) and ("free", request).
        - the prompts' prefill (in calls of at most `chunk` tokens a sequence, if given);
        - with shared prompts, each prompt forked into its samples, then ended;
        - decode, one token a sample a call, each sample ending when its tokens are in;
        - the rescore: every sample's prompt and generated tokens (but the last) as new requests,
          prefilled like the prompts, in blocks the rollout's requests held before."""
        prompts, samples, rescores = self.requests()
        ops = _prefill("prompt", prompts, self.prompt_lens, chunk)
        if self.forked:
            ops += [("fork", self.prompt_of[s], child) for s, child in enumerate(samples)]
            ops += [("free", p) for p in prompts]
        for step in range(1, max(self.generated) + 1):
            ops += [("free", samples[s]) for s, n in enumerate(self.generated) if n == step]
            live = [s for s, n in enumerate(self.generated) if n > step]
            if live:  # each live sample's last token goes in at its prompt + step - 1
                ops += [("add", samples[s], 1) for s in live]
                ops.append(Step("decode", tuple(samples[s] for s in live),
                                tuple(self.prompt_lens[self.prompt_of[s]] + step - 1 for s in live), (1,) * len(live)))
        return ops + _prefill("rescore", rescores, self.sample_lens, chunk) + [("free", r) for r in rescores]

    def calls(self, spec: CaseSpec) -> list[tuple[str, CaseSpec]]:
        """Every call the rollout makes, as (which, the call's case): what a backend's rules must
        accept. With a sliding window, each call twice: for the full and the sliding layers."""
        windows = sorted({TinyLM.window_of(spec, layer) for layer in range(LAYERS)}, key=lambda w: w or 0)
        return [(f"the rollout's {op.phase} call {i + 1}", spec.replace(batch=op.batch, calls="one", sliding_window=w))
                for i, op in enumerate(o for o in self.schedule(spec.sliding_window) if isinstance(o, Step))
                for w in windows]


def _prefill(phase: str, requests, lens, chunk: int | None) -> list:
    """Prefill calls over `requests`, at most `chunk` tokens of each a call."""
    ops, chunk = [], chunk or max(lens)
    for start in range(0, max(lens), chunk):
        part = [(r, start, min(chunk, n - start)) for r, n in zip(requests, lens) if n > start]
        ops += [("add", r, n) for r, _, n in part]
        ops.append(Step(phase, *map(tuple, zip(*part))))
    return ops


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

    @staticmethod
    def window_of(spec: CaseSpec, layer: int) -> int | None:
        """The keys a layer's query sees: with a sliding window, layers alternate full attention
        (layer 0) and the window, as Gemma 2's do."""
        return spec.sliding_window if layer % 2 else None

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
        out, _ = attend(one.replace(sliding_window=TinyLM.window_of(spec, layer)), rnd(q.to(acc)), keys, starts,
                        spec.heads.num_kv_heads, spec.heads.head_dim, rnd)
        return out.to(dtype)

    return lm.forward(tokens, positions, attention, dtype)


class _Layout:
    """Where the blocks of a manager of one protocol put the model's K/V: per layer a cache and its
    block size, and per request and layer the pages of its tokens (NULL_BLOCK where it holds none).
    A manager's block b is cache page pages[b], a shuffled pick past the null page 0, so tables are
    never contiguous whatever order the manager takes blocks in. make() gives the managers their
    pools; build() makes the caches (a dry run over the schedule has none)."""

    forks = False  # whether the protocol has fork()
    caches: list | None = None

    def held(self) -> list[int]:
        """The blocks (slots) each manager holds now."""
        raise NotImplementedError

    def fork(self, parent: int, child: int) -> None:
        raise NotImplementedError

    @staticmethod
    def _pages(n: int, device, gen: torch.Generator) -> list[int]:
        return (torch.randperm(n, generator=gen, device=device) + 1).tolist()


class _Paged(_Layout):
    """Every layer's blocks from one KVCacheManager, each layer a cache of its own; the block copies
    the manager asks for (copy-on-write) are made in every layer."""

    forks = True

    def __init__(self, spec: CaseSpec, manager: KVCacheManager):
        self.spec, self.manager, self.block_sizes = spec, manager, [spec.block_size] * LAYERS

    @classmethod
    def make(cls, manager: type, spec: CaseSpec, pools) -> "_Paged":
        return cls(spec, manager(pools[0], spec.block_size))

    def build(self, poison: float, device, gen) -> None:
        n = self.manager.num_blocks
        self.caches = [_allocate_cache(self.spec, 1 + n, poison, device)[:2] for _ in range(LAYERS)]
        self.pages = self._pages(n, device, gen)

    def held(self):
        return [self.manager.num_blocks - self.manager.num_free_blocks()]

    def add(self, request, n):
        for src, dst in self.manager.allocate(request, n):
            for k, v in self.caches or ():
                k[self.pages[dst]], v[self.pages[dst]] = k[self.pages[src]], v[self.pages[src]]

    def fork(self, parent, child):
        self.manager.fork(parent, child)

    def free(self, request):
        self.manager.free(request)

    def table(self, request, layer):
        return [self.pages[b] for b in self.manager.block_table(request)]


class _Hybrid(_Layout):
    """A HybridManager's full and sliding tables. Both kinds of layer share one cache, as in vLLM's
    hybrid allocator (a block is one kind's or the other's): a sliding block given back too soon is
    overwritten by the next request that takes it."""

    def __init__(self, spec: CaseSpec, manager: HybridManager):
        self.spec, self.manager, self.block_sizes = spec, manager, [spec.block_size] * LAYERS

    @classmethod
    def make(cls, manager: type, spec: CaseSpec, pools) -> "_Hybrid":
        return cls(spec, manager(pools[0], spec.block_size, spec.sliding_window))

    def build(self, poison, device, gen):
        self.caches = [_allocate_cache(self.spec, 1 + self.manager.num_blocks, poison, device)[:2]] * LAYERS
        self.pages = self._pages(self.manager.num_blocks, device, gen)

    def held(self):
        return [self.manager.num_blocks - self.manager.num_free_blocks()]

    def add(self, request, n):
        self.manager.allocate(request, n)

    def free(self, request):
        self.manager.free(request)

    def table(self, request, layer):
        kind = KINDS_OF_LAYER[TinyLM.window_of(self.spec, layer) is not None]
        return [self.pages[b] if b >= 0 else NULL_BLOCK for b in self.manager.block_table(request, kind)]


class _Ring(_Layout):
    """Sliding layers' K/V in a RingBufferManager's slots, a cache of one-slot blocks (token p's
    table entry is its slot while the ring holds it, the null page before); full layers' blocks
    from the suite's RefCountedBlocks. A windowed rollout prefills in calls of `window` tokens, so a
    ring of 2 * window - 1 slots holds every key a call's queries see while the call writes."""

    def __init__(self, spec: CaseSpec, blocks: RefCountedBlocks, ring: RingBufferManager):
        self.spec, self.full, self.ring = spec, _Paged(spec, blocks), ring
        self.block_sizes = [1 if TinyLM.window_of(spec, layer) else spec.block_size for layer in range(LAYERS)]

    @classmethod
    def make(cls, manager: type, spec: CaseSpec, pools) -> "_Ring":
        return cls(spec, RefCountedBlocks(pools[0], spec.block_size), manager(pools[1], 2 * spec.sliding_window - 1))

    def build(self, poison, device, gen):
        self.full.build(poison, device, gen)
        ring = _allocate_cache(self.spec.replace(block_size=1), 1 + self.ring.num_slots, poison, device)[:2]
        self.caches = [ring if TinyLM.window_of(self.spec, layer) else self.full.caches[layer]
                       for layer in range(LAYERS)]
        self.pages = self._pages(self.ring.num_slots, device, gen)

    def held(self):
        return self.full.held() + [self.ring.num_slots - self.ring.num_free_slots()]

    def add(self, request, n):
        self.full.add(request, n)
        self.ring.append(request, n)

    def free(self, request):
        self.full.free(request)
        self.ring.release(request)

    def table(self, request, layer):
        if not TinyLM.window_of(self.spec, layer):
            return self.full.table(request, layer)
        window = self.ring.window_slots(request)
        return [NULL_BLOCK] * (self.ring.position(request) - len(window)) + [self.pages[s] for s in window]


_LAYOUTS = {KVCacheManager: (_Paged, RefCountedBlocks), HybridManager: (_Hybrid, HybridBlocks),
            RingBufferManager: (_Ring, RingSlots)}
_LARGE_POOL = 1 << 14


def check_manager(manager: type, spec: CaseSpec) -> type:
    """The protocol of `manager` (managers.py), which must be able to hand out the blocks of the
    rollout `spec`: raises ValueError (a usage error, not the backend's) when it cannot."""
    protocol = next((p for p in _LAYOUTS if isinstance(manager, type) and issubclass(manager, p)), None)
    if protocol is None:
        raise ValueError(f"manager = {manager!r}: must be a subclass of one of "
                         f"{', '.join(p.__name__ for p in _LAYOUTS)}")
    if protocol is not KVCacheManager and spec.sliding_window is None:
        raise ValueError(f"CaseSpec.sliding_window = None: a {protocol.__name__} ({manager.name}) hands out the "
                         f"blocks of a rollout with a sliding window only (its model's sliding layers)")
    if Rollout.of(spec.batch).forked and not _LAYOUTS[protocol][0].forks:
        raise ValueError(f"CaseSpec.batch.shared_prefix_lens = {spec.batch.shared_prefix_lens}: a {protocol.__name__} "
                         f"({manager.name}) has no fork; its rollout needs a batch without shared prompts")
    return protocol


def layout(manager: type, spec: CaseSpec, schedule: list) -> _Layout:
    """The layout of `manager`'s blocks for a rollout's schedule, its pools as large as the most
    blocks the suite's own manager of that protocol holds at once over it (so that freed blocks
    come back into use soon)."""
    cls, reference = _LAYOUTS[check_manager(manager, spec)]
    dry = cls.make(reference, spec, (_LARGE_POOL, _LARGE_POOL))
    peak = dry.held()
    for op in schedule:
        if not isinstance(op, Step):
            getattr(dry, op[0])(*op[1:])
            peak = [max(a, b) for a, b in zip(peak, dry.held())]
    return cls.make(manager, spec, peak)


class PagedModel:
    """The model's caches for one backend, laid out by a manager's blocks (_Layout)."""

    def __init__(self, backend, lm: TinyLM, blocks: _Layout, device: torch.device, gen: torch.Generator):
        self.backend, self.lm, self.spec, self.blocks = backend, lm, lm.spec, blocks
        self.poison = poison_value(lm.spec.cache_dtype, backend.finite_poison)
        blocks.build(self.poison, device, gen)

    def step(self, op: Step, tokens: torch.Tensor, call) -> torch.Tensor:
        """One call per layer: the step's tokens (packed), whose tables and lengths the manager
        holds. call(backend, case) runs the backend (the runner's checked call)."""
        spec, dev = self.spec, tokens.device
        positions = torch.cat([torch.arange(s, s + n, device=dev) for s, n in zip(op.starts, op.lens)])
        seq = torch.repeat_interleave(torch.arange(len(op.lens), device=dev), torch.tensor(op.lens, device=dev))
        i32 = dict(dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, *torch.tensor(op.lens).cumsum(0).tolist()], **i32)
        h = spec.heads

        def attention(layer, q, k, v):
            one = spec.replace(batch=op.batch, calls="one", block_size=self.blocks.block_sizes[layer],
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
    """Generate through `backend` and rescore through it (Rollout.schedule), the blocks handed out by
    a `manager` (a class of one of the protocols of managers.py). call(backend, case) -> (out, lse)
    runs one checked call."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lm = TinyLM(spec, device, seed)
    r = Rollout.of(spec.batch)
    prompts = [torch.randint(VOCAB, (n,), generator=gen, device=device) for n in r.prompt_lens]
    noise = gumbel(len(r.prompt_of), max(r.generated), device, gen)
    schedule = r.schedule(spec.sliding_window)
    model = PagedModel(backend, lm, layout(manager, spec, schedule), device, gen)
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
