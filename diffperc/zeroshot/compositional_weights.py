"""Learned timestep weights for diffusion classifiers, fitted on saved per-timestep errors.

Jeong et al. (NeurIPS 2025 D&B), ``analysis_cfg/learn_timestep_weights.py`` of the released code:
a caption's score is the weighted mean over timesteps of its error, sum_t w_t e_t / S; the
weights (one per timestep, or a polynomial in the normalised timestep) are fitted with Adam
(lr 0.01 as released) on the cross-entropy of softmax(-score) against the correct candidate,
from N labelled items, with no model call (the errors come from an
:class:`~diffperc.zeroshot.compositional.ErrorBank`). ``positive=True`` parametrises w = exp(theta)
(the released ``--positive_weights``), so the fit starts from uniform weights.

Fewer items than timesteps: S free weights fitted on N < S items overfit, so ``mode="auto"``
(default) **regularises** by switching to a polynomial of degree min(``degree``, N - 1) and warns
saying so, and ``mode="per_timestep"`` **refuses** (raises) unless an L2 penalty towards uniform
weights (``l2`` > 0) is given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TimestepWeights", "choice_accuracy", "fit_timestep_weights"]

MODES = ("auto", "per_timestep", "polynomial")


@dataclass
class TimestepWeights:
    """Fitted weights (S,) (mean 1), how they were fitted, and the fit-set accuracy before and after (%)."""

    weights: Tensor
    mode: str
    degree: int | None
    n_items: int
    fit_accuracy_uniform: float
    fit_accuracy: float
    note: str = ""


def _check(errors: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    errors, labels = torch.as_tensor(errors, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    if errors.ndim != 3:
        raise ValueError(f"errors must be (N items, K candidates, S timesteps), got {tuple(errors.shape)}")
    if labels.shape != errors.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({errors.shape[0]},), got {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no items to fit or evaluate on")
    if (labels < 0).any() or (labels >= errors.shape[1]).any():
        raise ValueError(f"labels must be candidate indices in [0, {errors.shape[1]})")
    if torch.isnan(errors.gather(1, labels.view(-1, 1, 1).expand(-1, 1, errors.shape[2]))).any():
        raise ValueError("the correct candidate of some item has NaN errors")
    return errors, labels


def _scores(errors: Tensor, w: Tensor) -> Tensor:
    """(N, K, S) x (S,) -> (N, K) mean of weighted errors; NaN padding -> +inf (never chosen)."""
    s = (errors.nan_to_num(0.0) * w).mean(-1)
    return s.masked_fill(torch.isnan(errors).all(-1), float("inf"))


def choice_accuracy(errors: Tensor, labels: Tensor, weights: Tensor | None = None) -> float:
    """Accuracy (%) of argmin weighted error against ``labels``; ties count as wrong. errors (N, K, S)."""
    errors, labels = _check(errors, labels)
    w = torch.ones(errors.shape[2]) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    s = _scores(errors, w)
    best = s.min(1, keepdim=True).values
    unique = (s == best).sum(1) == 1
    return 100.0 * float(((s.argmin(1) == labels) & unique).float().mean())


def _poly_basis(positions: Tensor, total: int, degree: int) -> Tensor:
    t = 2 * positions.float() / max(total - 1, 1) - 1  # normalised timestep in [-1, 1]
    return torch.stack([t**i for i in range(degree + 1)], dim=1)  # (S, degree + 1)


def fit_timestep_weights(errors: Tensor, labels: Tensor, timesteps: Tensor | None = None, total: int = 1000,
                         mode: str = "auto", degree: int = 3, positive: bool = True, l2: float = 0.0,
                         steps: int = 500, lr: float = 0.01) -> TimestepWeights:
    """Fit timestep weights on N items' saved errors.

    Args:
        errors: (N, K, S) error of each item's K candidates (NaN = no such candidate) per timestep.
        labels: (N,) index of the correct candidate.
        timesteps: (S,) timestep positions in [0, ``total``) (for the polynomial); default evenly spread.
        mode: ``"auto"``, ``"per_timestep"`` or ``"polynomial"`` (see the module docstring).
        degree: polynomial degree (capped at N - 1).
        positive: weights = exp(theta) (start uniform, stay positive); False fits raw weights starting at 1.
        l2: penalty l2 * mean(theta^2) (log-weights, or weights - 1) pulling towards uniform.
        steps, lr: Adam steps and learning rate (released: lr 0.01).

    Returns:
        :class:`TimestepWeights` (weights normalised to mean 1).
    """
    errors, labels = _check(errors, labels)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    N, _, S = errors.shape
    note = ""
    if mode == "auto":
        mode = "per_timestep" if N >= S else "polynomial"
        if mode == "polynomial":
            note = (f"fitted on {N} items < {S} timesteps: regularised by fitting a degree-{min(degree, N - 1)} "
                    f"polynomial ({min(degree, N - 1) + 1} parameters) instead of {S} free weights")
            warnings.warn(note, stacklevel=2)
    if mode == "per_timestep" and N < S and l2 <= 0:
        raise ValueError(f"refusing to fit {S} free timestep weights on {N} items (fewer items than timesteps "
                         f"overfits): give more items, mode='polynomial' or 'auto', or l2 > 0")
    pos = torch.linspace(0, total - 1, S) if timesteps is None else torch.as_tensor(timesteps).float()
    deg = min(degree, N - 1) if mode == "polynomial" else None
    basis = _poly_basis(pos, total, deg) if deg is not None else None
    theta = torch.zeros(S if basis is None else deg + 1, requires_grad=True)

    def weights() -> Tensor:
        raw = theta if basis is None else basis @ theta
        return raw.exp() if positive else raw + 1.0

    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = -_scores(errors, weights())  # padded candidates: -inf, probability 0
        loss = F.cross_entropy(logits, labels) + l2 * theta.pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w = weights().clamp_min(0)
        w = w / w.mean().clamp_min(1e-12)
    return TimestepWeights(w, mode, deg, N, choice_accuracy(errors, labels), choice_accuracy(errors, labels, w), note)
