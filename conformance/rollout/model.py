"""The tiny causal LM: seeded weights, LAYERS layers of RMSNorm, rotary attention and a residual,
then the unembedding; and the same model teacher-forced with the reference's attention, in float64
(the truth) or in a dtype (its noise)."""
from __future__ import annotations

import torch

from ..reference import attend, precision_of
from ..spec import BatchSpec, CaseSpec

VOCAB = 256
LAYERS = 2
D_MODEL = 256
UNEMBED_GAIN = 4.0  # logits of std about 4: log-probabilities spread over a few units, some near ties


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
