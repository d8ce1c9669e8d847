"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, "Single-Stage Semantic Segmentation from
Image Labels", CVPR 2020; visinf/1-stage-wseg ``models/mods/pamr.py``, used by karazijal/sdov
``utils/pamr.py`` with 10 iterations and dilations 1, 2, 4, 8, 12, 24).

Each pixel's score vector is replaced, ``num_iter`` times, by an average of its 8 neighbours at
every dilation (replicate padding), weighted by a softmax over neighbours of the negative image
difference |I_p - I_q| / (1e-8 + 0.1 std), the std taken over the 3x3 neighbourhood (centre
included) at all dilations, the weights averaged over colour channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pamr"]

# the 8 neighbours in the released kernel order (rows of a 3x3 window, centre skipped)
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(x: Tensor, dilations: Sequence[int], centre: bool = False) -> Tensor:
    """(B, K, H, W) -> (B, K, P, H, W): the values at each offset x dilation (replicate padding)."""
    h, w = x.shape[-2:]
    offsets = _OFFSETS[:4] + ((0, 0),) + _OFFSETS[4:] if centre else _OFFSETS
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        out.extend(padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w] for dy, dx in offsets)
    return torch.stack(out, dim=2)


@torch.no_grad()
def pamr(image: Tensor, scores: Tensor, num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> Tensor:
    """Refine (B, C, h, w) scores with a (B, K, H, W) image; returns (B, C, H, W).

    The scores are first resized to the image (bilinear, ``align_corners=True``, as released).
    """
    scores = F.interpolate(scores.float(), size=image.shape[-2:], mode="bilinear", align_corners=True)
    x = image.float()
    std = _neighbours(x, dilations, centre=True).std(2, keepdim=True)  # (B, K, 1, H, W)
    aff = -(x[:, :, None] - _neighbours(x, dilations)).abs() / (1e-8 + 0.1 * std)
    aff = F.softmax(aff.mean(1, keepdim=True), dim=2)  # (B, 1, P, H, W)
    for _ in range(num_iter):
        scores = (_neighbours(scores, dilations) * aff).sum(2)
    return scores
