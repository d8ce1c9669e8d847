"""Prompt leakage probes: does the LLM read the diffusion prompt back out of the visual tokens?

Mustafar (arXiv 2507.07106) observes that an LLM fed question-conditioned diffusion features can
recover the prompt text from them, and tests it by captioning with **mismatched captions**: the
diffusion tower is conditioned on the caption of another image and one counts how often the
generated caption repeats that caption instead of describing the image. Mitigations: caption
(prompt) dropout in training, and pre-training without any prompt (questions only in fine-tuning).

- :func:`mismatched` picks, for each sample, a prompt of another class (a fixed derangement).
- :func:`repetition_rates` counts generated captions equal to the mismatched vs the true caption.
- :func:`prompt_probe` fits a linear classifier on mean-pooled visual tokens to recover which prompt
  conditioned them (train and test on disjoint images); chance is 1 / number of prompts. The tower is
  frozen, so this measures what is *available* to the LLM; the repetition rate measures whether the
  trained LLM *uses* it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["mismatched", "prompt_probe", "repetition_rates"]


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def mismatched(labels: Tensor, num_classes: int, seed: int = 0) -> Tensor:
    """For each label, a different class drawn uniformly (seeded): (N,) int64, never equal to ``labels``."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, labels.shape, generator=g)
    return (labels + shift) % num_classes


def repetition_rates(generated: Sequence[str], mismatched_captions: Sequence[str],
                     true_captions: Sequence[str]) -> dict[str, float]:
    """``{"repeats_mismatched", "matches_true"}``: fractions of generated captions equal (case, spaces and
    periods ignored) to the mismatched prompt and to the image's true caption."""
    n = len(generated)
    if not n or not (n == len(mismatched_captions) == len(true_captions)):
        raise ValueError(f"need as many generated ({n}), mismatched ({len(mismatched_captions)}) and true "
                         f"({len(true_captions)}) captions, at least one")
    rep = sum(_norm(g) == _norm(m) for g, m in zip(generated, mismatched_captions, strict=True))
    true = sum(_norm(g) == _norm(t) for g, t in zip(generated, true_captions, strict=True))
    return {"repeats_mismatched": rep / n, "matches_true": true / n}


def prompt_probe(train_tokens: Tensor, train_prompt: Tensor, test_tokens: Tensor, test_prompt: Tensor,
                 max_iter: int = 500) -> dict[str, float]:
    """Linear probe recovering the prompt id from visual tokens.

    Args:
        train_tokens, test_tokens: (N, T, C) or (N, C, h, w) visual tokens/maps of disjoint images.
        train_prompt, test_prompt: (N,) int prompt ids that conditioned them.
        max_iter: iterations of the logistic regression (lbfgs).

    Returns:
        ``{"accuracy", "chance"}`` on the test images (chance = the most frequent test prompt's share).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def pool(x: Tensor) -> Tensor:
        return (x.flatten(2).mean(2) if x.ndim == 4 else x.mean(1)).float().cpu()

    xtr, xte = pool(train_tokens).numpy(), pool(test_tokens).numpy()
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=max_iter).fit(scaler.transform(xtr), train_prompt.numpy())
    acc = float((clf.predict(scaler.transform(xte)) == test_prompt.numpy()).mean())
    chance = float(torch.bincount(test_prompt).max()) / len(test_prompt)
    return {"accuracy": acc, "chance": chance}
