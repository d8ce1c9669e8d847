"""OVDiff inference: sliding crops, cosine scores against prototypes, averaging, threshold, argmax.

karazijal/sdov ``predict.py:556-647``: the test image (short side resized to 448, LANCZOS) is cut
into sliding crops of 448 and 336 px (stride 224; mmseg's slide grid, the last crop flush with the
border) plus the whole image. For every extractor and crop: features L2-normalised, cosine to
every prototype (``einsum("hwf,lckf->lckhw")``), prototypes of absent classes and padding set to
-1, max per (class, fg/bg set), background = max over the classes' bg maxima, so a C + 1 channel
map (channel 0 = background) is bilinearly resized to the crop, clamped to [-1, 1] and summed into
the image; the sum is divided by how many crops (and extractors) covered each pixel. Optional
PAMR; then the map is resized to the label map's size, scores <= 0 become 0 and the argmax is the
label (so a pixel no class beats is background).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .prototypes import PrototypeBank

__all__ = ["crop_boxes", "labels_from_scores", "score_features"]


def crop_boxes(h: int, w: int, crops: Sequence[int] = (448, 336), strides: Sequence[int] = (224, 224),
               full: bool = True) -> list[tuple[int, int, int, int]]:
    """(y1, x1, y2, x2) sliding windows of each size (mmseg's grid, ``predict.py:563-585``) and the whole image."""
    if len(crops) != len(strides):
        raise ValueError(f"crops and strides must pair up, got {list(crops)} and {list(strides)}")
    boxes = []
    for crop, stride in zip(crops, strides, strict=True):
        if crop < 1 or stride < 1:
            raise ValueError(f"crop sizes and strides must be >= 1, got {crop}, {stride}")
        rows = max(h - crop + stride - 1, 0) // stride + 1
        cols = max(w - crop + stride - 1, 0) // stride + 1
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
                boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    if full:
        boxes.append((0, 0, h, w))
    return boxes


def score_features(feats: Tensor, bank: PrototypeBank, keep: Tensor | None = None, normalize: bool = True) -> Tensor:
    """Per-pixel scores of one feature map against a prototype bank.

    Args:
        feats: (D, h, w) features of a crop.
        bank: the extractor's :class:`~diffperc.zeroshot.ovseg.prototypes.PrototypeBank` (2, C, K, D).
        keep: (C,) bool, the classes kept for this image (CLIP filter); None keeps all.
        normalize: L2-normalise the features first (released default).

    Returns:
        (1 + C, h, w): channel 0 = max over the kept classes' bg prototypes, channel 1 + c = max
        over class c's fg prototypes (-1 where a class is not kept).
    """
    d = feats.shape[0]
    if d != bank.protos.shape[-1]:
        raise ValueError(f"features have {d} channels but the prototypes {bank.protos.shape[-1]}: "
                         "were they built by another extractor?")
    fs = feats.float().permute(1, 2, 0)  # (h, w, D)
    if normalize:
        fs = fs / fs.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    protos = bank.protos.to(fs)
    mask = bank.mask.to(fs.device)
    if keep is not None:
        mask = mask & keep.to(fs.device).view(1, -1, 1)
    sim = torch.einsum("hwf,lckf->lckhw", fs, protos)
    sim = torch.where(mask[..., None, None], sim, torch.full_like(sim, -1)).max(dim=2).values  # (2, C, h, w)
    return torch.cat([sim[0].max(dim=0, keepdim=True).values, sim[1]], dim=0)


def labels_from_scores(scores: Tensor, size: tuple[int, int] | None = None, threshold: float = 0.0,
                       drop_background: bool = False) -> Tensor:
    """(1 + C, h, w) averaged scores -> (H, W) int64 labels (``predict.py:633-645``).

    Args:
        scores: averaged scores, channel 0 = background.
        size: label map size (the annotation's); scores are resized bilinearly to it.
        threshold: scores <= threshold become 0 before the argmax (released 0).
        drop_background: argmax over the C classes only (datasets without a background label,
            mmseg's ``reduce_zero_label``: Pascal Context 59).
    """
    if size is not None and tuple(scores.shape[-2:]) != tuple(size):
        scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    scores = torch.where(scores > threshold, scores, torch.zeros_like(scores))
    if drop_background:
        scores = scores[1:]
    return scores.argmax(dim=0)
