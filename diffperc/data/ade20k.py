"""ADE20K scene parsing (SceneParsing benchmark, ``ADEChallengeData2016``), 150 classes.

Layout (the released zip, http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip)::

    <root>/                      (ADEChallengeData2016, or a folder that contains it)
      images/training/ADE_train_00000001.jpg ...     20,210 images
      images/validation/ADE_val_00000001.jpg ...     2,000 images
      annotations/training/ADE_train_00000001.png    8-bit greyscale, 0 = other, k = class k (1..150)
      annotations/validation/ADE_val_00000001.png

Labels follow mmseg's ``reduce_zero_label``: 0 -> 255 (ignored), k -> k - 1 (0..149). A stored
value above 150 is an error naming the file.

Transforms, as mmseg 0.x's pipeline in VPD's ``segmentation/configs/_base_/datasets/ade20k_vpd.py``
(``scale=(2048, 512)``), on uint8 images with random numbers from ``numpy.random`` in mmseg's
order (:mod:`diffperc.data._augment`):

- train: Resize (r ~ U(0.5, 2.0), scale ``(int(2048 r), int(512 r))``, keep ratio: the largest
  size with long side <= scale[0] and short side <= scale[1]; image bilinear as OpenCV, labels
  OpenCV nearest), RandomCrop ``crop_size`` redrawn up to 10 times until no class covers
  ``cat_max_ratio`` or more of the labelled pixels, RandomFlip (p=0.5), PhotoMetricDistortion
  (``color_aug``), then Pad to ``crop_size``: image grey (mmseg pads with 0 after normalising by
  mean = std = 127.5, i.e. 0.5 in [0, 1]), label 255.
- val/test/predict: the image resized keeping the ratio to long side <= 2048 and short side <= 512
  (bilinear); the label map at its **original** size (``eval_label_size="original"``): the task
  resizes the logits back to it (bilinear) before the argmax, as mmseg scores ADE20K.
  ``"resized"`` gives the label map resized (nearest) to the image instead.
  Eval images differ in size: ``eval_batch_size`` defaults to 1.

``scale=None`` skips resizing (train: r times the original size), for tiny test data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._augment import photo_metric_distortion, resize_bilinear_u8, resize_nearest
from ._dense import (
    IGNORE_INDEX,
    DenseDataModule,
    check_dir,
    load_rgb_u8,
    pad_to,
    read_label_png,
    rescale_size,
    size_pair,
    u8_to_tensor,
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
EVAL_LABEL_SIZES = ("original", "resized")


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
    """One ADE20K split: ``{"image": (3, H, W) in [0, 1], "mask": (h, w) int64 0..149 or 255, "name": str}``.

    Args:
        root: ADEChallengeData2016 (or its parent).
        split: ``"train"``/``"training"`` or ``"val"``/``"validation"``.
        train: mmseg's training pipeline; False resizes keeping the ratio (module docstring).
        crop_size: training crop (H, W) or side (512).
        scale: mmseg's (long, short) resize scale, or None for no resize.
        ratio_range: training resize ratios r.
        cat_max_ratio: RandomCrop's largest allowed share of one class (1.0 disables the redraws).
        color_aug: mmseg's PhotoMetricDistortion on training crops.
        eval_label_size: ``"original"`` (mmseg) or ``"resized"`` label maps at eval.
        rng: source of the training randomness (``random_sample``, ``randint``, ``rand``,
            ``uniform``); None = the ``numpy.random`` module, as mmseg.
    """

    def __init__(self, root: str | Path, split: str = "val", train: bool = False,
                 crop_size: int | Sequence[int] = (512, 512), scale: Sequence[int] | None = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 color_aug: bool = True, eval_label_size: Literal["original", "resized"] = "original",
                 rng: Any = None) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if eval_label_size not in EVAL_LABEL_SIZES:
            raise ValueError(f"eval_label_size must be one of {EVAL_LABEL_SIZES}, got {eval_label_size!r}")
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
        self.scale = None if scale is None else (int(scale[0]), int(scale[1]))
        self.ratio_range, self.cat_max_ratio, self.color_aug = tuple(ratio_range), cat_max_ratio, color_aug
        self.eval_label_size, self.rng = eval_label_size, rng

    def __len__(self) -> int:
        return len(self.samples)

    def _size(self, h: int, w: int, ratio: float | None) -> tuple[int, int]:
        """mmseg's Resize target: keep-ratio rescale to ``scale`` (times ``ratio``, truncated as mmseg does)."""
        if self.scale is None:
            r = 1.0 if ratio is None else ratio
            return int(h * r + 0.5), int(w * r + 0.5)
        if ratio is None:
            return rescale_size(h, w, self.scale)
        return rescale_size(h, w, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))

    def _crop_box(self, labels: np.ndarray, rng: Any) -> tuple[int, int, int, int]:
        """mmseg RandomCrop: (y1, y2, x1, x2), redrawn up to 10 times while one class dominates."""
        def draw() -> tuple[int, int, int, int]:
            top = rng.randint(0, max(labels.shape[0] - self.crop_size[0], 0) + 1)
            left = rng.randint(0, max(labels.shape[1] - self.crop_size[1], 0) + 1)
            return top, top + self.crop_size[0], left, left + self.crop_size[1]

        box = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                ids, counts = np.unique(labels[box[0] : box[1], box[2] : box[3]], return_counts=True)
                counts = counts[ids != IGNORE_INDEX]
                if len(counts) > 1 and np.max(counts) / np.sum(counts) < self.cat_max_ratio:
                    break
                box = draw()
        return box

    def _train_item(self, image: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        rng = self.rng if self.rng is not None else np.random
        ratio = rng.random_sample() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        size = self._size(*labels.shape, ratio)
        image, labels = resize_bilinear_u8(image, size), resize_nearest(labels, size)
        y1, y2, x1, x2 = self._crop_box(labels, rng)
        image, labels = image[y1:y2, x1:x2], labels[y1:y2, x1:x2]
        if rng.rand() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if self.color_aug:
            image = photo_metric_distortion(np.ascontiguousarray(image), rng)
        # mmseg normalises by mean = std = 127.5, then pads with 0: grey (0.5) in [0, 1]
        img = pad_to(u8_to_tensor(image), self.crop_size, 0.5)
        mask = pad_to(torch.from_numpy(np.ascontiguousarray(labels)), self.crop_size, IGNORE_INDEX)
        return img, mask

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        img_path, ann_path = self.samples[index]
        image = load_rgb_u8(img_path)  # (H, W, 3) uint8
        labels = reduce_zero_label(torch.from_numpy(read_label_png(ann_path)), ann_path).numpy()  # (H, W)
        if image.shape[:2] != labels.shape:
            raise ValueError(f"image {img_path} is {image.shape[:2]} (HxW) but {ann_path} is {labels.shape}")
        if self.train:
            img, mask = self._train_item(image, labels)
        else:
            size = self._size(*labels.shape, None)
            img = u8_to_tensor(resize_bilinear_u8(image, size))
            if self.eval_label_size == "resized":
                labels = resize_nearest(labels, size)
            mask = torch.from_numpy(np.ascontiguousarray(labels))
        return {"image": img.contiguous(), "mask": mask.long().contiguous(), "name": img_path.stem}


class ADE20KDataModule(DenseDataModule):
    """ADE20K: train on ``training``, validate/test/predict on ``validation`` (test labels are not public).

    Args:
        root: ADEChallengeData2016 or the folder that contains it.
        crop_size: training crop (H, W) or side (512).
        scale: mmseg's resize scale (long, short); None keeps the original size (tiny test data).
        ratio_range: training resize ratios.
        cat_max_ratio: RandomCrop redraw threshold (1.0: off).
        color_aug: mmseg's PhotoMetricDistortion on training crops.
        eval_label_size: ``"original"``: eval label maps at the annotation's size, scored there after
            the task resizes the logits back (mmseg); ``"resized"``: label maps resized to the image.
        batch_size, num_workers: see :class:`DenseDataModule` (VPD: 2 per GPU x 8 GPUs).
        eval_batch_size: eval images (and label maps) differ in size, so 1 by default.

    Attributes:
        class_names: the 150 class names in label order (:data:`ADE20K_CLASSES`).
    """

    def __init__(self, root: str, crop_size: int | Sequence[int] = (512, 512), scale: Sequence[int] | None = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, color_aug: bool = True,
                 eval_label_size: Literal["original", "resized"] = "original", batch_size: int = 2,
                 num_workers: int = 0, eval_batch_size: int | None = 1) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        self.root = find_ade_root(root)
        self.crop_size = size_pair(crop_size, "crop_size")
        self.scale, self.ratio_range = scale, ratio_range
        self.cat_max_ratio, self.color_aug = cat_max_ratio, color_aug
        if eval_label_size not in EVAL_LABEL_SIZES:
            raise ValueError(f"eval_label_size must be one of {EVAL_LABEL_SIZES}, got {eval_label_size!r}")
        self.eval_label_size = eval_label_size
        self.class_names = list(ADE20K_CLASSES)

    def build(self) -> dict[str, Dataset]:
        train = ADE20KDataset(self.root, "train", True, self.crop_size, self.scale, self.ratio_range,
                              self.cat_max_ratio, self.color_aug)
        val = ADE20KDataset(self.root, "val", False, self.crop_size, self.scale,
                            eval_label_size=self.eval_label_size)
        return {"train": train, "val": val, "test": val, "predict": val}
