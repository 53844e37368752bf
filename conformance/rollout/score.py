"""The generated tokens scored by the reference model (float64, and its noise in the dtype), and
the first token the float64 model would not have chosen."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .drive import Generated
from .model import NOISE_FORMS, reference_logprobs


@dataclass
class Scores:
    """The same tokens scored by the reference model."""

    truth: torch.Tensor  # float64 model and attention
    noise_forms: list[torch.Tensor]  # the model in the dtype, with the reference attention in each of NOISE_FORMS
    # The first generated token the float64 model would not have chosen: (sample, step, the float64
    # margin of its own choice over the one made), or None.
    divergence: tuple[int, int, float] | None


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
