"""Shared readers and transforms of the dense-prediction datasets (depth, segmentation, referring).

Images are (3, H, W) float32 tensors in [0, 1]; depth maps (1, H, W) float32 metres with
0 = invalid; label maps (H, W) int64 with 255 = ignore. Random transforms draw from torch's
global generator, which Lightning's ``seed_everything(workers=True)`` seeds per worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["IGNORE_INDEX", "IMAGE_SUFFIXES", "DenseDataModule", "check_dir", "crop", "hflip", "load_rgb",
           "load_rgb_u8", "pad_to", "random_crop_box", "read_depth_png", "read_label_png", "rescale_size",
           "resize_image", "resize_mask", "size_pair", "u8_to_tensor"]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- arguments and files
def size_pair(size: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    """``S`` or ``(H, W)`` -> ``(H, W)`` positive ints; None stays None."""
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(not isinstance(v, int) or v < 1 for v in hw):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


def check_dir(path: Path, what: str, layout: str) -> Path:
    """Raise FileNotFoundError naming ``path`` and the expected ``layout`` (a short tree) unless it is a folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {path} does not exist. Expected layout:\n{layout}")
    return path


def load_rgb_u8(path: Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB array (what the VPD pipelines augment before normalising)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except OSError as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def u8_to_tensor(pixels: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1] (torchvision's ``to_tensor``)."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def load_rgb(path: Path) -> Tensor:
    """An image file -> (3, H, W) float32 in [0, 1] (RGB)."""
    return u8_to_tensor(load_rgb_u8(path))


def _png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk of a PNG file, independent of Pillow's mode names."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != _PNG_MAGIC or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return head[24], head[25]


def read_depth_png(path: Path, depth_scale: float = 1000.0) -> Tensor:
    """A 16-bit greyscale PNG (e.g. NYUv2 depth in millimetres) -> (1, H, W) float32 = png / depth_scale.

    Zero pixels stay 0 (invalid). Any other bit depth or colour type is an error naming the file:
    an 8-bit PNG would silently cap depth at 255 / depth_scale.
    """
    if not path.is_file():
        raise FileNotFoundError(f"depth map {path} does not exist")
    bits, colour = _png_header(path)
    if bits != 16 or colour != 0:
        raise ValueError(f"depth map {path} is a {bits}-bit PNG of colour type {colour}; expected a 16-bit "
                         f"greyscale PNG (colour type 0) of depth x {depth_scale:g}")
    with Image.open(path) as img:
        values = np.array(img, dtype=np.int64)  # Pillow gives "I;16"/"I": exact uint16 values
    return torch.from_numpy(values.astype(np.float32) / np.float32(depth_scale))[None]


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG (8/16-bit greyscale, or palette: the index is the label) -> (H, W) int64 ids as stored."""
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} does not exist")
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"label map {path} has PIL mode {img.mode!r}; expected a single-channel PNG "
                                 "(8/16-bit greyscale or palette) of class ids")
            return np.array(img, dtype=np.int64)
    except OSError as err:
        raise OSError(f"cannot read label map {path}: {err}") from err


# ---------------------------------------------------------------------------- geometry
def rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= scale[0] and short side <= scale[1]."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, H, W) -> (C, h, w), bilinear (antialiased when shrinking), clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]
    return out.clamp_(0, 1)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) or (1, H, W) labels/depth -> same rank at ``size``, nearest neighbour (no label or depth mixing)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    x = mask.reshape(1, 1, *mask.shape[-2:]).float()
    out = F.interpolate(x, size=size, mode="nearest-exact").to(mask.dtype)
    return out.reshape(*mask.shape[:-2], *size)


def random_crop_box(h: int, w: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A uniform random (top, left, height, width) box of ``size`` inside (h, w) (smaller sides are kept whole)."""
    ch, cw = min(size[0], h), min(size[1], w)
    top = int(torch.randint(0, h - ch + 1, ()).item())
    left = int(torch.randint(0, w - cw + 1, ()).item())
    return top, left, ch, cw


def crop(x: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """Crop the last two dims of ``x`` to box (top, left, height, width)."""
    top, left, h, w = box
    return x[..., top : top + h, left : left + w]


def hflip(x: Tensor) -> Tensor:
    """Mirror the last dim (width)."""
    return x.flip(-1)


def pad_to(x: Tensor, size: tuple[int, int], value: float) -> Tensor:
    """Pad the last two dims at the bottom/right up to ``size`` with ``value`` (mmseg's Pad)."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh <= 0 and dw <= 0:
        return x
    return F.pad(x, (0, max(dw, 0), 0, max(dh, 0)), value=value)


def cat_max_ratio_ok(mask: Tensor, cat_max_ratio: float) -> bool:
    """mmseg's RandomCrop check: >1 labelled class and none covering more than ``cat_max_ratio`` of them."""
    labels = mask[mask != IGNORE_INDEX]
    if labels.numel() == 0:
        return False
    counts = torch.bincount(labels.flatten())
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle of range(n) into (train, val) with round(n * val_fraction) val items (at least 1 if n > 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1 if val_fraction > 0 else 0, math.floor(n * val_fraction + 0.5)))
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---------------------------------------------------------------------------- DataModule base
class DenseDataModule(LightningDataModule):
    """Shared loaders: subclasses fill ``self.datasets`` ({"train", "val", "test", "predict"}) in ``setup``.

    Args:
        batch_size: items per training batch.
        num_workers: DataLoader worker processes.
        eval_batch_size: items per val/test/predict batch (default ``batch_size``; use 1 where
            eval images differ in size).
    """

    def __init__(self, batch_size: int, num_workers: int, eval_batch_size: int | None) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size and eval_batch_size must be >= 1 and num_workers >= 0, got {batch_size}, "
                             f"{eval_batch_size}, {num_workers}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.datasets: dict[str, Dataset] = {}

    def build(self) -> dict[str, Dataset]:
        """The datasets of every stage (called once, by ``setup``)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.build()

    def _loader(self, stage: str) -> DataLoader:
        self.setup()
        train = stage == "train"
        return DataLoader(self.datasets[stage], batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, drop_last=train and len(self.datasets[stage]) > self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
