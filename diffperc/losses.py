"""Losses with the exact definitions of the recipes diffperc follows.

``silog_loss``: the scale-invariant log loss (Eigen et al., NeurIPS 2014, arXiv 1406.2283) in the
square-root form of GLPDepth / VPD (github.com/wl-zhao/VPD depth/utils_depth/criterion.py):

    d = log(target) - log(pred) over valid pixels
    loss = sqrt(mean(d^2) - lambda * mean(d)^2)

with lambda = 0.5 and **no** scale factor (BTS multiplies by 10 and uses lambda 0.85; VPD does not).
The mean runs over all valid pixels of the whole batch, as in VPD.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["silog_loss"]


def silog_loss(pred: Tensor, target: Tensor, valid_mask: Tensor | None = None, lam: float = 0.5,
               eps: float = 1e-8) -> Tensor:
    """Scale-invariant log loss, VPD/GLPDepth square-root form.

    Args:
        pred: (B, 1, H, W) (or any shape equal to ``target``'s) predicted depth, > 0 at valid pixels.
        target: same shape, ground-truth depth; 0 marks missing depth.
        valid_mask: same shape, bool; None = ``target > 0`` (VPD).
        lam: lambda in [0, 1]; 0 = RMSE of log depth, 1 = fully scale invariant (VPD: 0.5).
        eps: floor of the variance under the square root, so the gradient stays finite when the
            prediction is exactly right (VPD has none; its users report NaN losses, VPD issue #18).

    Returns:
        scalar loss; 0 (still attached to ``pred``'s graph) when no pixel is valid.
    """
    if pred.shape != target.shape:
        raise ValueError(f"silog_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same "
                         "shape; resize the prediction to the target first (head(features, size=target.shape[-2:]))")
    if not 0 <= lam <= 1:
        raise ValueError(f"silog_loss: lam must be in [0, 1], got {lam}")
    if valid_mask is None:
        valid_mask = target > 0
    elif valid_mask.shape != target.shape or valid_mask.dtype != torch.bool:
        raise ValueError(f"silog_loss: valid_mask must be a bool tensor of shape {tuple(target.shape)}, "
                         f"got {valid_mask.dtype} {tuple(valid_mask.shape)}")
    p, t = pred[valid_mask].float(), target[valid_mask].float()
    if p.numel() == 0:
        return pred.sum() * 0.0
    if not bool((torch.isfinite(p) & (p > 0) & torch.isfinite(t) & (t > 0)).all()):  # one sync, then diagnose
        if not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ValueError("silog_loss: target must be finite and > 0 at valid pixels (0 marks missing depth)")
        if not bool(torch.isfinite(p).all()):
            raise ValueError("silog_loss: pred contains NaN or Inf at valid pixels")
        raise ValueError("silog_loss: pred must be > 0 at valid pixels (depth in metres, e.g. sigmoid * max_depth), "
                         f"got min {p.min().item():.3g}")
    d = torch.log(t) - torch.log(p)
    return torch.sqrt(torch.clamp((d**2).mean() - lam * d.mean() ** 2, min=eps))
