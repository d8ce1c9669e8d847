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


# ---------------------------------------------------------------------------- Lightning
from lightning.pytorch import LightningDataModule  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402


class DigitsDataset(Dataset):
    """One split of the digits as ``{"image": (3, S, S) in [0, 1], "label": () int64}`` items.

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"`` (see :func:`load`).
        image_size: side S of the images.
        limit: keep only the first ``limit`` images (tiny runs); None keeps all.
    """

    def __init__(self, split: str = "train", image_size: int = IMAGE_SIZE, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        self.images, self.labels = load(split, image_size)
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class DigitsDataModule(LightningDataModule):
    """The digits for a task: train = the ``"train"`` split, val and test = ``"heldout"``.

    Batches are ``{"image": (B, 3, S, S) in [0, 1], "label": (B,) int64 in 0-9}``.

    Args:
        batch_size: images per batch.
        num_workers: DataLoader workers (0: load in the main process; the data is in memory).
        limit: use at most this many images per split (tiny runs); None uses all.
        image_size: side S of the images (32 for the bundled model).
    """

    num_classes = len(CLASS_WORDS)

    def __init__(self, batch_size: int = 64, num_workers: int = 0, limit: int | None = None,
                 image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.batch_size, self.num_workers, self.limit, self.image_size = batch_size, num_workers, limit, image_size
        self.train_set: DigitsDataset | None = None
        self.heldout_set: DigitsDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = DigitsDataset("train", self.image_size, self.limit)
        if self.heldout_set is None:
            self.heldout_set = DigitsDataset("heldout", self.image_size, self.limit)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.heldout_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.heldout_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.heldout_set, shuffle=False)


__all__ += ["DigitsDataModule", "DigitsDataset"]
