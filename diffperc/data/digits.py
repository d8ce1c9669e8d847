"""scikit-learn's bundled handwritten digits as images for the bundled ``digits`` model.

``sklearn.datasets.load_digits()`` holds 1797 8x8 greyscale digits (ink = 16). They are
upsampled to 32x32 (bilinear), scaled to [0, 1] and repeated to 3 channels: white digits on
black, as the bundled model was trained. Images 0-1499 are the ``"train"`` split; images
1500-1796 are ``"heldout"`` and are never used to train the bundled model: every test and
report that uses the model evaluates on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLASS_WORDS", "HELDOUT_START", "IMAGE_SIZE", "caption", "load"]

HELDOUT_START = 1500
IMAGE_SIZE = 32
CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SPLITS = {"train": slice(0, HELDOUT_START), "heldout": slice(HELDOUT_START, None), "all": slice(None)}


def caption(label: int, template: str = "a photo of the digit {}") -> str:
    """The caption of a digit class, e.g. ``caption(7) == "a photo of the digit seven"``."""
    return template.format(CLASS_WORDS[label])


def load(split: str = "heldout", image_size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """Load a split of the digits.

    Args:
        split: ``"train"`` (images 0-1499), ``"heldout"`` (1500-1796) or ``"all"``.
        image_size: side of the returned images (32 for the bundled model).

    Returns:
        images (N, 3, image_size, image_size) float32 in [0, 1], labels (N,) int64 in 0-9.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.as_tensor(data.images[_SPLITS[split]], dtype=torch.float32) / 16.0  # (N, 8, 8)
    labels = torch.as_tensor(data.target[_SPLITS[split]], dtype=torch.int64)
    images = F.interpolate(pixels[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).repeat(1, 3, 1, 1).contiguous(), labels
