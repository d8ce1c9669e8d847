"""ADE20K scene parsing (SceneParsing benchmark, ``ADEChallengeData2016``), 150 classes.

Layout (the released zip, http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip)::

    <root>/                      (ADEChallengeData2016, or a folder that contains it)
      images/training/ADE_train_00000001.jpg ...     20,210 images
      images/validation/ADE_val_00000001.jpg ...     2,000 images
      annotations/training/ADE_train_00000001.png    8-bit greyscale, 0 = other, k = class k (1..150)
      annotations/validation/ADE_val_00000001.png

Labels follow mmseg's ``reduce_zero_label``: 0 -> 255 (ignored), k -> k - 1 (0..149). A stored
value above 150 is an error naming the file.

Transforms, as mmseg's ADE20K config used by VPD (Zhao et al., ICCV 2023) with ``scale=(2048, 512)``:

- train: RandomResize (keep ratio: the largest size with long side <= 2048 r, short side <=
  512 r, r ~ U(0.5, 2.0)), RandomCrop ``crop_size`` retried up to 10 times until no class covers
  more than ``cat_max_ratio`` of the labelled pixels, flip (p=0.5), optional photometric jitter,
  and padding to ``crop_size`` (image 0, label 255) so crops stack into batches.
- val/test/predict: Resize keep ratio to long side <= 2048 and short side <= 512 (so the short
  side becomes 512 unless the image is more than 4:1). The label map is resized with nearest
  neighbour to the image size; mmseg instead scores at the original size, which differs only
  at resampled boundaries. Eval images differ in size: ``eval_batch_size`` defaults to 1.

``scale=None`` skips resizing (train: r times the original size), for tiny test data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._dense import (
    IGNORE_INDEX,
    DenseDataModule,
    cat_max_ratio_ok,
    check_dir,
    color_jitter,
    crop,
    hflip,
    load_rgb,
    pad_to,
    random_crop_box,
    read_label_png,
    rescale_size,
    resize_image,
    resize_mask,
    size_pair,
)

__all__ = ["ADE20K_CLASSES", "ADE20KDataModule", "ADE20KDataset", "reduce_zero_label"]

# The first synonym of each row of objectInfo150.txt, in label order (mmseg's list says
# "television receiver" for class 89 and has a trailing space in "bed ").
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)
LAYOUT = """<root>/   (ADEChallengeData2016)
  images/training/*.jpg         images/validation/*.jpg
  annotations/training/*.png    annotations/validation/*.png   (8-bit, 0 = other, 1..150 = classes)"""
_SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def reduce_zero_label(labels: Tensor, path: Path | str, num_classes: int = 150) -> Tensor:
    """Stored ids (H, W) int64 in 0..num_classes -> 0 -> 255 (ignore), k -> k - 1; other values: error naming path."""
    bad = (labels < 0) | (labels > num_classes)
    if bad.any():
        raise ValueError(f"annotation {path} has label values {sorted(labels[bad].unique().tolist())[:10]} outside "
                         f"0..{num_classes} (0 = other, 1..{num_classes} = classes)")
    return torch.where(labels == 0, IGNORE_INDEX, labels - 1)


def find_ade_root(root: str | Path) -> Path:
    """``root`` if it holds ``images/`` and ``annotations/``, else ``root/ADEChallengeData2016``; error otherwise."""
    root = Path(root).expanduser()
    for cand in (root, root / "ADEChallengeData2016"):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    raise FileNotFoundError(f"ADE20K root {root} has no images/ and annotations/ folders. Expected layout:\n{LAYOUT}")


class ADE20KDataset(Dataset):
    """One ADE20K split: ``{"image": (3, H, W) in [0, 1], "mask": (H, W) int64 0..149 or 255, "name": str}``.

    Args:
        root: ADEChallengeData2016 (or its parent).
        split: ``"train"``/``"training"`` or ``"val"``/``"validation"``.
        train: random resize/crop/flip; False resizes keeping the ratio (see the module docstring).
        crop_size: training crop (H, W) or side (512).
        scale: mmseg's (long, short) resize scale, or None for no resize.
        ratio_range: training resize ratios r.
        cat_max_ratio: RandomCrop's largest allowed share of one class (1.0 disables the retries).
        color_aug: photometric jitter on training crops.
    """

    def __init__(self, root: str | Path, split: str = "val", train: bool = False,
                 crop_size: int | Sequence[int] = (512, 512), scale: Sequence[int] | None = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 color_aug: bool = True) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.root = find_ade_root(root)
        folder = _SPLITS[split]
        images = check_dir(self.root / "images" / folder, "ADE20K images", LAYOUT)
        labels = check_dir(self.root / "annotations" / folder, "ADE20K annotations", LAYOUT)
        self.samples = [(p, labels / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]
        if not self.samples:
            raise FileNotFoundError(f"no .jpg images in {images}. Expected layout:\n{LAYOUT}")
        missing = [str(ann) for _, ann in self.samples if not ann.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} ADE20K annotation(s) missing, e.g. {missing[0]}; each image "
                                    f"images/{folder}/<name>.jpg needs annotations/{folder}/<name>.png")
        self.train, self.crop_size = train, size_pair(crop_size, "crop_size")
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        self.ratio_range, self.cat_max_ratio, self.color_aug = tuple(ratio_range), cat_max_ratio, color_aug

    def __len__(self) -> int:
        return len(self.samples)

    def _resize(self, image: Tensor, mask: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
        h, w = image.shape[-2:]
        if self.scale is None:
            size = (int(h * ratio + 0.5), int(w * ratio + 0.5))
        else:
            size = rescale_size(h, w, (self.scale[0] * ratio, self.scale[1] * ratio))
        return resize_image(image, size), resize_mask(mask, size)

    def _random_crop(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        box = random_crop_box(*mask.shape, self.crop_size)
        if self.cat_max_ratio < 1.0:
            for _ in range(9):  # mmseg: up to 10 draws, keep the last
                if cat_max_ratio_ok(crop(mask, box), self.cat_max_ratio):
                    break
                box = random_crop_box(*mask.shape, self.crop_size)
        return crop(image, box), crop(mask, box)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        img_path, ann_path = self.samples[index]
        image = load_rgb(img_path)  # (3, H, W)
        mask = reduce_zero_label(torch.from_numpy(read_label_png(ann_path)), ann_path)  # (H, W)
        if image.shape[-2:] != mask.shape:
            raise ValueError(f"image {img_path} is {tuple(image.shape[-2:])} (HxW) but {ann_path} is "
                             f"{tuple(mask.shape)}")
        if self.train:
            image, mask = self._resize(image, mask, random.uniform(*self.ratio_range))
            image, mask = self._random_crop(image, mask)
            if torch.rand(()) < 0.5:
                image, mask = hflip(image), hflip(mask)
            if self.color_aug:
                image = color_jitter(image)
            image, mask = pad_to(image, self.crop_size, 0.0), pad_to(mask, self.crop_size, IGNORE_INDEX)
        else:
            image, mask = self._resize(image, mask, 1.0)
        return {"image": image.contiguous(), "mask": mask.contiguous(), "name": img_path.stem}


class ADE20KDataModule(DenseDataModule):
    """ADE20K: train on ``training``, validate/test/predict on ``validation`` (test labels are not public).

    Args:
        root: ADEChallengeData2016 or the folder that contains it.
        crop_size: training crop (H, W) or side (512).
        scale: mmseg's resize scale (long, short); None keeps the original size (tiny test data).
        ratio_range: training resize ratios.
        cat_max_ratio: RandomCrop retry threshold (1.0: off).
        color_aug: photometric jitter on training crops.
        batch_size, num_workers: see :class:`DenseDataModule`.
        eval_batch_size: eval images differ in size, so 1 by default.

    Attributes:
        class_names: the 150 class names in label order (:data:`ADE20K_CLASSES`).
    """

    def __init__(self, root: str, crop_size: int | Sequence[int] = (512, 512), scale: Sequence[int] | None = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, color_aug: bool = True,
                 batch_size: int = 2, num_workers: int = 0, eval_batch_size: int | None = 1) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        self.root = find_ade_root(root)
        self.crop_size = size_pair(crop_size, "crop_size")
        self.scale, self.ratio_range = scale, ratio_range
        self.cat_max_ratio, self.color_aug = cat_max_ratio, color_aug
        self.class_names = list(ADE20K_CLASSES)

    def build(self) -> dict[str, Dataset]:
        train = ADE20KDataset(self.root, "train", True, self.crop_size, self.scale, self.ratio_range,
                              self.cat_max_ratio, self.color_aug)
        val = ADE20KDataset(self.root, "val", False, self.crop_size, self.scale)
        return {"train": train, "val": val, "test": val, "predict": val}
