"""Sliding-window SD features and SD-DINO's shared noise.

SD-DINO (Zhang et al., NeurIPS 2023, arXiv 2305.15347, repo Junyi42/sd-dino) extracts SD
features through its vendored ODISE backbone, ``FeatureExtractorBackbone.slide_forward``
(third_party/ODISE/odise/modeling/backbone/feature_extractor.py:189-259) with ODISE's
``backbone_in_size=(512, 512)`` and ``slide_training=True``
(configs/common/models/odise_with_label.py:16-29):

- the crop is square, side ``min(512, min(H, W))`` (feature_extractor.py:206-214), and the
  nominal stride equals the crop; the last crop of each axis is moved back to end at the
  border (feature_extractor.py:218-232), so a 960 px canvas gets crops at 0 and 448
  (an effective stride of 448, 64 px of overlap);
- each crop runs alone; a level of reduction r places its crop map at
  ``[y1 // r : y2 // r, x1 // r : x2 // r]``, sums overlapping crops and divides each cell by
  the number of crops that covered it (feature_extractor.py:237-257). Here all crops run in
  one batch, and a crop offset that is not a multiple of r (which ODISE would floor, placing
  the crop up to a cell off) is an error.

Noise (ODISE ``LdmExtractor``, third_party/ODISE/odise/modeling/meta_arch/ldm.py:430-436 and
835-846): one fixed ``randn(1, 4, 64, 64)`` from a CPU generator seeded 42, bicubically
resized (align_corners=False) when a latent is not 64x64, and used for every image and crop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["shared_noise", "sliding_window", "window_boxes"]


def window_boxes(height: int, width: int, window: int) -> list[tuple[int, int, int, int]]:
    """Crops (y1, x1, y2, x2) of ODISE's ``slide_forward``, row-major.

    Args:
        height, width: canvas size in pixels.
        window: nominal crop side (ODISE: 512); the crop is ``min(window, height, width)``.

    Returns:
        Square crops of side ``min(window, height, width)`` covering the canvas, placed at
        multiples of the side and the last one of each axis shifted back to the border.
    """
    if window < 1 or height < 1 or width < 1:
        raise ValueError(f"window, height and width must be >= 1, got {window}, {height}, {width}")
    crop = min(window, height, width)  # feature_extractor.py:207 (slide training: min of in-size and image)
    stride = crop  # feature_extractor.py:216
    rows = max(height - crop + stride - 1, 0) // stride + 1  # feature_extractor.py:218-219
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))  # feature_extractor.py:227-232
    return boxes


def sliding_window(run: Callable[[Tensor], Sequence[Tensor]], images: Tensor, window: int,
                   reductions: Sequence[int]) -> list[Tensor]:
    """Features of overlapping crops, placed by their reduction and averaged where crops overlap.

    Args:
        run: maps a batch of crops (N, 3, c, c) to feature maps, one (N, C_i, c / r_i, c / r_i)
            per level (e.g. a ``DiffusionBackbone`` call); all crops of all images go in one call.
        images: (B, 3, H, W) canvas.
        window: nominal crop side (see :func:`window_boxes`).
        reductions: r_i of each level (image pixels per feature cell).

    Returns:
        One (B, C_i, H // r_i, W // r_i) map per level.
    """
    b, _, h, w = images.shape
    boxes = window_boxes(h, w, window)
    crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])  # (n*B, 3, c, c), crop-major
    feats = run(crops)
    if len(feats) != len(reductions):
        raise ValueError(f"run returned {len(feats)} feature maps for {len(reductions)} reductions")
    out = []
    for f, r in zip(feats, reductions, strict=True):
        total = f.new_zeros(b, f.shape[1], h // r, w // r)  # feature_extractor.py:195-204
        count = torch.zeros(1, 1, h // r, w // r, device=f.device, dtype=f.dtype)
        for k, (y1, x1, y2, x2) in enumerate(boxes):
            part = f[k * b : (k + 1) * b]
            cell = (slice(y1 // r, y2 // r), slice(x1 // r, x2 // r))  # feature_extractor.py:238-241
            if y1 % r or x1 % r or part.shape[-2:] != total[..., cell[0], cell[1]].shape[-2:]:
                # ODISE would floor the offset and place the crop up to a cell off: refuse instead
                raise ValueError(
                    f"crop ({y1}, {x1})-({y2}, {x2}) of the {h}x{w} canvas does not start on the {r} px cells of a "
                    f"level: choose a canvas whose crop offsets (side - crop) are multiples of {r} "
                    f"(SD-DINO: 960 px with window 512, offsets 448)")
            total[..., cell[0], cell[1]] += part  # feature_extractor.py:252
            count[..., cell[0], cell[1]] += 1  # feature_extractor.py:253
        if (count == 0).any():
            raise ValueError(f"the crops do not cover the {h // r}x{w // r} grid of reduction {r}")
        out.append(total / count)  # feature_extractor.py:256-257
    return out


def shared_noise(latent_hw: tuple[int, int], channels: int = 4, seed: int = 42,
                 size: tuple[int, int] = (64, 64)) -> Tensor:
    """ODISE's shared noise for a latent of ``latent_hw``: (1, channels, *latent_hw) float32 on the CPU.

    ``randn(1, channels, *size)`` from ``torch.Generator().manual_seed(seed)`` (ldm.py:430-436),
    resized bicubically (align_corners=False) to ``latent_hw`` when it differs (ldm.py:836-845).
    """
    noise = torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(seed))
    if tuple(latent_hw) != tuple(size):
        noise = F.interpolate(noise, size=tuple(latent_hw), mode="bicubic", align_corners=False)
    return noise
