"""Open-vocabulary segmentation benchmarks in their on-disk formats (as mmseg 0.x reads them).

- ``voc``: PASCAL VOC 2012 val, 21 classes with background (``VOCdevkit/VOC2012``:
  ``ImageSets/Segmentation/val.txt``, ``JPEGImages/<id>.jpg``, palette PNGs
  ``SegmentationClass/<id>.png`` with 255 = void). Class names and prompt words as OVDiff's
  ``mmdata.py`` (airplane, table, monitor; "pottedplant" prompted as "potted plant").
- ``context60`` / ``context59``: PASCAL Context val (``VOCdevkit/VOC2010``:
  ``ImageSets/SegmentationContext/val.txt``, ``SegmentationClassContext/<id>.png`` with 0 =
  background, 1-59 the classes, written by mmseg's ``tools/convert_datasets/pascal_context.py``);
  context59 drops the background (mmseg ``reduce_zero_label``: 0 -> 255, k -> k - 1). Names as
  GroupViT / TCL use them; stuff classes from OVDiff's stored stuff/thing list (``mmdata.py``
  IS_STUFF).
- ``coco_object``: COCO-Object val (``images/val2017/*.jpg``,
  ``annotations/val2017/<stem>_instanceTrainIds.png``: COCO-Stuff 164k labels with the 80 thing
  classes as 1-80 and stuff as 0, by GroupViT's ``convert_coco_object.py``), 81 classes.
- ``digit_scenes``: 64x64 canvases with 1-3 held-out sklearn digits pasted in distinct quadrants
  (labels known exactly; ink > 0.5 = the digit, faint ink and touching digits = 255), vocabulary
  the ten digit words: the real check of the bundled model.

Items: ``{"image": (3, H, W) float in [0, 1] at the original size, "mask": (H, W) int64, "name": str}``;
batches are lists (images differ in size).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ._dense import load_rgb, read_label_png

__all__ = ["COCO_OBJECT_CLASSES", "CONTEXT_CLASSES", "CONTEXT_STUFF", "DATASETS", "DigitScenesDataset",
           "OVSegDataModule", "OVSegDataset", "VOC_CLASSES", "VOC_PROMPTS", "digit_scenes"]

VOC_CLASSES = ("background", "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "table", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "monitor")
VOC_PROMPTS = {"pottedplant": "potted plant"}
CONTEXT_CLASSES = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "monitor", "wall", "water", "window", "wood")
CONTEXT_STUFF = ("bedclothes", "ceiling", "cloth", "curtain", "fence", "floor", "grass", "ground", "mountain",
                 "platform", "road", "rock", "sidewalk", "sky", "snow", "track", "wall", "water", "wood")
COCO_OBJECT_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
DIGIT_CLASSES = ("background", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# name -> (classes incl. background, prompt words, stuff, reduce_zero_label, layout help)
_LAYOUT = {
    "voc": "VOCdevkit/VOC2012/\n  ImageSets/Segmentation/val.txt\n  JPEGImages/<id>.jpg\n  SegmentationClass/<id>.png",
    "context": "VOCdevkit/VOC2010/\n  ImageSets/SegmentationContext/val.txt\n  JPEGImages/<id>.jpg\n"
               "  SegmentationClassContext/<id>.png (mmseg tools/convert_datasets/pascal_context.py)",
    "coco_object": "coco_stuff164k/\n  images/val2017/<stem>.jpg\n  annotations/val2017/<stem>_instanceTrainIds.png "
                   "(GroupViT convert_dataset/convert_coco_object.py)",
}
DATASETS = ("voc", "context60", "context59", "coco_object", "digit_scenes")


def _find(root: Path, marker: str, candidates: Sequence[str]) -> Path:
    """``root`` or the first ``root/<candidate>`` that contains ``marker``."""
    for c in ("", *candidates):
        if (root / c / marker).exists():
            return root / c
    return root


class OVSegDataset(Dataset):
    """One of the on-disk benchmarks (``voc``, ``context60``, ``context59``, ``coco_object``).

    Args:
        dataset: which benchmark.
        root: its folder (VOC2012 / VOC2010 or a folder holding ``VOCdevkit``; COCO: the folder
            holding ``images`` and ``annotations``).
        split: split file stem (``val``) or, for COCO, the image folder (``val2017``).
        limit: keep the first ``limit`` images.
    """

    def __init__(self, dataset: str, root: str | Path, split: str = "val", limit: int | None = None) -> None:
        if dataset not in DATASETS[:4]:
            raise ValueError(f"dataset must be one of {list(DATASETS[:4])}, got {dataset!r}")
        self.dataset, self.reduce_zero_label = dataset, dataset == "context59"
        root = Path(root).expanduser()
        if not root.is_dir():
            key = "context" if dataset.startswith("context") else dataset
            raise FileNotFoundError(f"{dataset}: root {root} does not exist. Expected layout:\n{_LAYOUT[key]}")
        if dataset == "coco_object":
            self.root = root
            img_dir, ann_dir = root / "images" / split, root / "annotations" / split
            if not img_dir.is_dir() or not ann_dir.is_dir():
                raise FileNotFoundError(f"coco_object: expected {img_dir} and {ann_dir}. Layout:\n{_LAYOUT['coco_object']}")
            stems = sorted(p.stem for p in img_dir.glob("*.jpg"))  # mmseg: all images of img_dir, sorted
            self.items = [(img_dir / f"{s}.jpg", ann_dir / f"{s}_instanceTrainIds.png", s) for s in stems]
        else:
            voc = dataset == "voc"
            sub, seg = ("VOC2012", "SegmentationClass") if voc else ("VOC2010", "SegmentationClassContext")
            sets = "Segmentation" if voc else "SegmentationContext"
            self.root = _find(root, f"ImageSets/{sets}", [f"VOCdevkit/{sub}", sub])
            split_file = self.root / "ImageSets" / sets / f"{split}.txt"
            if not split_file.is_file():
                key = "voc" if voc else "context"
                raise FileNotFoundError(f"{dataset}: split file {split_file} does not exist. Layout:\n{_LAYOUT[key]}")
            ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
            self.items = [(self.root / "JPEGImages" / f"{i}.jpg", self.root / seg / f"{i}.png", i) for i in ids]
        if not self.items:
            raise ValueError(f"{dataset}: no images found under {root} (split {split!r})")
        if limit is not None:
            self.items = self.items[:limit]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img_path, ann_path, name = self.items[index]
        image = load_rgb(img_path)
        mask = torch.from_numpy(read_label_png(ann_path))
        if mask.shape != image.shape[-2:]:
            raise ValueError(f"{ann_path} is {tuple(mask.shape)} but {img_path} is {tuple(image.shape[-2:])}")
        if self.reduce_zero_label:  # mmseg: 0 -> 255, k -> k - 1, 255 stays
            mask = torch.where(mask == 0, 255, torch.where(mask == 255, 255, mask - 1))
        return {"image": image, "mask": mask, "name": name}


# ---------------------------------------------------------------------------- digit scenes
def digit_scenes(num: int, seed: int = 0, split: str = "heldout", canvas: int = 64, max_digits: int = 3,
                 jitter: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Scenes of 1..max_digits sklearn digits (32 px, white on black) pasted in distinct quadrants.

    Args:
        num: number of scenes.
        seed: numpy seed of the choices (digits, counts, quadrants, offsets).
        split: digits split (``heldout`` = images 1500-1796, never seen by the bundled model).
        canvas: canvas side (64 = 2x2 digits).
        max_digits: at most this many digits (<= 4).
        jitter: random shift of each digit inside its quadrant, in pixels.

    Returns:
        images (num, 3, canvas, canvas) in [0, 1]; masks (num, canvas, canvas) int64 (0 = background,
        d + 1 = digit d, 255 = faint ink 0.15-0.5 or ink of two digits); labels (num, 4) digit per
        slot, -1 where empty.
    """
    from .digits import load

    if not 1 <= max_digits <= 4:
        raise ValueError(f"max_digits must be in 1..4, got {max_digits}")
    digits, labels = load(split)  # (N, 3, 32, 32)
    side = digits.shape[-1]
    rng = np.random.default_rng(seed)
    images = torch.zeros(num, 3, canvas, canvas)
    masks = torch.zeros(num, canvas, canvas, dtype=torch.long)
    slots = torch.full((num, 4), -1, dtype=torch.long)
    half = canvas // 2
    for s in range(num):
        k = int(rng.integers(1, max_digits + 1))
        quads = rng.permutation(4)[:k]
        ink = torch.zeros(k, canvas, canvas)
        for j, q in enumerate(quads):
            idx = int(rng.integers(len(digits)))
            y = min(max(int(q // 2) * half + int(rng.integers(-jitter, jitter + 1)), 0), canvas - side)
            x = min(max(int(q % 2) * half + int(rng.integers(-jitter, jitter + 1)), 0), canvas - side)
            ink[j, y : y + side, x : x + side] = digits[idx, 0]
            slots[s, j] = labels[idx]
        strongest, which = ink.max(0)
        images[s] = strongest.expand(3, -1, -1)
        m = torch.where(strongest > 0.5, slots[s, :k][which] + 1, 0)
        m[(strongest > 0.15) & (strongest <= 0.5)] = 255
        m[(ink > 0.15).sum(0) > 1] = 255
        masks[s] = m
    return images, masks, slots


class DigitScenesDataset(Dataset):
    """:func:`digit_scenes` as dataset items (``name`` = ``scene_<i>``)."""

    def __init__(self, num: int = 200, seed: int = 0, split: str = "heldout", canvas: int = 64) -> None:
        self.images, self.masks, _ = digit_scenes(num, seed, split, canvas)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "mask": self.masks[index], "name": f"scene_{index:04d}"}


# ---------------------------------------------------------------------------- Lightning
def collate_list(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Batches as lists (images of different sizes)."""
    return {k: [it[k] for it in items] for k in items[0]}


class OVSegDataModule(LightningDataModule):
    """The test split of an open-vocabulary segmentation benchmark, and its vocabulary.

    Args:
        dataset: ``voc``, ``context60``, ``context59``, ``coco_object`` or ``digit_scenes``.
        root: the dataset folder (unused for ``digit_scenes``).
        split: ``val`` (COCO: ``val2017``; digit scenes: the digits split, ``heldout``).
        limit: first ``limit`` images only (digit scenes: the number of scenes, default 200).
        batch_size: images per batch (lists).
        num_workers: DataLoader workers.
        seed: digit scenes' seed.

    Attributes:
        eval_classes: names of the label ids (index = id; VOC: 21 with background).
        classes: the vocabulary without background (what OVDiff samples).
        prompts: class -> prompt word(s); stuff: the stuff classes; reduce_zero_label: labels have no background.
    """

    def __init__(self, dataset: str = "voc", root: str | None = None, split: str = "val", limit: int | None = None,
                 batch_size: int = 1, num_workers: int = 2, seed: int = 0) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
        if dataset != "digit_scenes" and root is None:
            raise ValueError(f"dataset {dataset!r} needs root (the dataset folder)")
        self.dataset, self.root, self.split, self.limit = dataset, root, split, limit
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        names = {"voc": VOC_CLASSES, "context60": CONTEXT_CLASSES, "context59": CONTEXT_CLASSES,
                 "coco_object": COCO_OBJECT_CLASSES, "digit_scenes": DIGIT_CLASSES}[dataset]
        self.reduce_zero_label = dataset == "context59"
        self.classes = list(names[1:])
        self.eval_classes = self.classes if self.reduce_zero_label else list(names)
        self.prompts = dict(VOC_PROMPTS) if dataset == "voc" else {}
        self.stuff = [c for c in CONTEXT_STUFF if c in self.classes] if dataset.startswith("context") else []
        self._data: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._data is not None:
            return
        if self.dataset == "digit_scenes":
            split = "heldout" if self.split == "val" else self.split
            self._data = DigitScenesDataset(self.limit or 200, self.seed, split)
        else:
            self._data = OVSegDataset(self.dataset, self.root, self.split, self.limit)

    def _loader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._data, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_list)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
