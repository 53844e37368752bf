"""The rollout as an engine schedules it: what a case's batch asks for (the prompts, the samples,
their lengths) and, in order, the calls (Steps) and the KV-cache manager's operations."""
from __future__ import annotations

from dataclasses import dataclass

from ..spec import BatchSpec


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


def _prefill(phase: str, requests, lens, chunk: int | None) -> list:
    """Prefill calls over `requests`, at most `chunk` tokens of each a call."""
    ops, chunk = [], chunk or max(lens)
    for start in range(0, max(lens), chunk):
        part = [(r, start, min(chunk, n - start)) for r, n in zip(requests, lens) if n > start]
        ops += [("add", r, n) for r, _, n in part]
        ops.append(Step(phase, *map(tuple, zip(*part))))
    return ops
