"""Camouflaged instance segmentation data: COD10K-v3 and NC4K (COCO-style JSON), any COCO instance folder.

Layouts, as OSFormer (PJLallen/OSFormer ``adet/data/datasets/cis.py``) and DCNet distribute them::

    <root>/COD10K-v3/annotations/train_instance.json   <root>/COD10K-v3/Train/Image/*.jpg
    <root>/COD10K-v3/annotations/test2026.json         <root>/COD10K-v3/Test/Image/*.jpg
    <root>/NC4K/nc4k_test.json                         <root>/NC4K/Imgs/*.jpg

(the raw COD10K-v3 release names its files ``Train/CAM_Instance_Train.json`` and
``Test/CAM_Instance_Test.json``; both are looked for). The JSONs are COCO instance annotations:
``images`` (id, file_name, height, width), ``annotations`` (image_id, category_id, segmentation as
polygons or RLE, iscrowd) and ``categories``; OSFormer trains class-agnostic with one class,
``"foreground"``. A user's own data is any COCO instance JSON + image folder
(:class:`CocoInstanceDataModule`). Needs pycocotools (``diffperc[coco]``).

Items: ``image`` (3, S, S) in [0, 1] (long side resized to S, keeping the aspect, then padded
bottom/right with grey 0.5 to S x S), ``masks`` (T, S, S) uint8 (padding 0), ``labels`` (T,) int64
in [0, K), ``iscrowd`` (T,), ``size`` (h, w) of the resized image inside the padding, ``orig_size``
(H, W), ``name`` (file name) and, for evaluation, ``orig_masks`` (T, H, W) uint8: AP is computed at
the original resolution. Training drops crowd regions and images without instances (detectron2's
``filter_empty_annotations``) and flips horizontally with probability 0.5.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ._dense import IMAGE_SUFFIXES, DenseDataModule, load_rgb, resize_image
from .refcoco import annotation_mask

__all__ = ["CamouflageDataModule", "CocoInstanceDataModule", "CocoInstanceDataset", "ImageFolderDataset",
           "collate_instances", "letterbox"]

LAYOUTS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    # split -> candidates of (annotation json, image folder), relative to root
    "cod10k": {
        "train": (("COD10K-v3/annotations/train_instance.json", "COD10K-v3/Train/Image"),
                  ("COD10K-v3/Train/CAM_Instance_Train.json", "COD10K-v3/Train/Image")),
        "test": (("COD10K-v3/annotations/test2026.json", "COD10K-v3/Test/Image"),
                 ("COD10K-v3/Test/CAM_Instance_Test.json", "COD10K-v3/Test/Image")),
    },
    "nc4k": {"test": (("NC4K/nc4k_test.json", "NC4K/Imgs"),)},
}
LAYOUT_TEXT = """<root>/COD10K-v3/annotations/train_instance.json  + COD10K-v3/Train/Image/
<root>/COD10K-v3/annotations/test2026.json        + COD10K-v3/Test/Image/
<root>/NC4K/nc4k_test.json                        + NC4K/Imgs/"""


@lru_cache(maxsize=4)
def _load_json(file: str, mtime_ns: int) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{file} is not a COCO instance file: it lacks {missing}")
    return data


def letterbox(image: Tensor, size: int) -> tuple[Tensor, tuple[int, int]]:
    """(3, H, W) -> (3, size, size): long side resized to ``size`` (aspect kept), grey-padded bottom/right.

    Returns:
        (padded image, (h, w) of the resized image inside it).
    """
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = resize_image(image, hw)
    return F.pad(out, (0, size - hw[1], 0, size - hw[0]), value=0.5), hw


def _resize_masks(masks: Tensor, hw: tuple[int, int], size: int) -> Tensor:
    """(T, H, W) uint8 -> (T, size, size): nearest to ``hw``, zero-padded."""
    if len(masks) == 0:
        return masks.new_zeros(0, size, size)
    out = F.interpolate(masks[None].float(), size=hw, mode="nearest-exact")[0].to(masks.dtype)
    return F.pad(out, (0, size - hw[1], 0, size - hw[0]))


class CocoInstanceDataset(Dataset):
    """Images and instance masks of one COCO instance JSON.

    Args:
        ann_file: the JSON; image_dir: the folder its ``file_name`` entries are relative to.
        image_size: side S of the letterboxed images.
        train: training items (flip, no crowd, no empty images, no ``orig_masks``).
        class_agnostic: every category becomes class 0 (OSFormer's single "foreground" class).
        limit: keep the first ``limit`` images (smoke tests).
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, image_size: int = 512, train: bool = False,
                 class_agnostic: bool = False, limit: int | None = None) -> None:
        self.ann_file, self.image_dir = Path(ann_file).expanduser(), Path(image_dir).expanduser()
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file {self.ann_file} does not exist (a COCO instance JSON)")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} does not exist")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        data = _load_json(str(self.ann_file), self.ann_file.stat().st_mtime_ns)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"{self.ann_file} has no categories")
        self.category_ids = [c["id"] for c in cats]
        self.class_names = ["foreground"] if class_agnostic else [str(c["name"]) for c in cats]
        self._label = {cid: 0 if class_agnostic else i for i, cid in enumerate(self.category_ids)}
        anns: dict[int, list[dict[str, Any]]] = {}
        for a in data["annotations"]:
            if a["category_id"] not in self._label:
                raise ValueError(f"{self.ann_file}: annotation {a.get('id')} has category_id {a['category_id']} "
                                 f"that is not among the categories {self.category_ids[:10]}")
            if train and a.get("iscrowd", 0):
                continue
            anns.setdefault(a["image_id"], []).append(a)
        images = sorted(data["images"], key=lambda i: i["id"])
        if train:
            images = [i for i in images if anns.get(i["id"])]
        self.images = images[:limit] if limit is not None else images
        if not self.images:
            raise ValueError(f"{self.ann_file} has no {'annotated ' if train else ''}images")
        self.anns, self.image_size, self.train = anns, int(image_size), train

    def __len__(self) -> int:
        return len(self.images)

    def _targets(self, info: dict[str, Any], h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
        anns = self.anns.get(info["id"], [])
        if not anns:
            return torch.zeros(0, h, w, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        masks = np.stack([annotation_mask(a["segmentation"], h, w, overlaps="union") for a in anns])
        labels = torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.long)
        crowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.long)
        return torch.from_numpy(masks), labels, crowd

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        image = load_rgb(path)
        h, w = image.shape[-2:]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(f"{path} is {h}x{w} but {self.ann_file.name} says {info.get('height')}x{info.get('width')}")
        masks, labels, crowd = self._targets(info, h, w)
        if self.train and torch.rand(()) < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
        padded, hw = letterbox(image, self.image_size)
        item = {"image": padded, "masks": _resize_masks(masks, hw, self.image_size), "labels": labels,
                "iscrowd": crowd, "size": torch.tensor(hw), "orig_size": torch.tensor([h, w]),
                "name": str(info["file_name"]), "image_id": int(info["id"])}
        if not self.train:
            item["orig_masks"] = masks
        return item


class ImageFolderDataset(Dataset):
    """Every image under a folder (recursively, sorted), letterboxed, for ``predict`` (no annotations)."""

    def __init__(self, root: str | Path, image_size: int = 512) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_rgb(self.paths[index])
        padded, hw = letterbox(image, self.image_size)
        return {"image": padded, "size": torch.tensor(hw), "orig_size": torch.tensor(image.shape[-2:]),
                "orig_image": image, "name": self.paths[index].relative_to(self.root).as_posix()}


_LIST_KEYS = ("masks", "labels", "iscrowd", "orig_masks", "orig_image", "name", "image_id")


def collate_instances(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``image``/``size``/``orig_size``; keep per-image lists of the rest (instance counts differ)."""
    if not items:
        raise ValueError("empty batch")
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in ("image", "size", "orig_size")}
    for k in _LIST_KEYS:
        if k in items[0]:
            batch[k] = [it[k] for it in items]
    return batch


class CocoInstanceDataModule(DenseDataModule):
    """Instance segmentation from COCO JSON + image folders (the user's own data).

    Args:
        train_json, train_images: training split (None: no training).
        val_json, val_images: validation split (None: the test split).
        test_json, test_images: test split (None: the validation split).
        image_size: letterbox side S (a multiple of the backbone's size multiple, e.g. 64 for SD).
        class_agnostic: one class ``"foreground"``; class_names: replace the JSON's names (prompts).
        predict_images: folder of images for ``predict`` (default: the test images with annotations ignored);
            alone (no JSON), the module serves ``predict`` only (``diffperc predict`` on a folder).
        batch_size, num_workers, eval_batch_size: see :class:`DenseDataModule`.
        limit: at most this many images per split.
    """

    def __init__(self, train_json: str | None = None, train_images: str | None = None, val_json: str | None = None,
                 val_images: str | None = None, test_json: str | None = None, test_images: str | None = None,
                 image_size: int = 512, class_agnostic: bool = False, class_names: list[str] | None = None,
                 predict_images: str | None = None, batch_size: int = 2, num_workers: int = 0,
                 eval_batch_size: int | None = None, limit: int | None = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.splits = {"train": (train_json, train_images), "val": (val_json, val_images),
                       "test": (test_json, test_images)}
        for split, (js, img) in self.splits.items():
            if (js is None) != (img is None):
                raise ValueError(f"give both {split}_json and {split}_images, or neither")
        has_json = any(js is not None for js, _ in self.splits.values())
        if not has_json and predict_images is None:
            raise ValueError("CocoInstanceDataModule needs train_json, val_json, test_json or predict_images")
        self.image_size, self.class_agnostic, self.limit = image_size, class_agnostic, limit
        self.predict_images = predict_images
        self._names = list(class_names) if class_names is not None else None
        # predict-only (a folder of images): the task's own class names unless given here
        self.class_names = self._names or (self._json_names() if has_json else None)

    def _json_names(self) -> list[str]:
        js = next(js for js, _ in self.splits.values() if js is not None)
        if self.class_agnostic:
            return ["foreground"]
        path = Path(js).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {path} does not exist (a COCO instance JSON)")
        data = _load_json(str(path), path.stat().st_mtime_ns)
        return [str(c["name"]) for c in sorted(data["categories"], key=lambda c: c["id"])]

    def build(self) -> dict[str, Dataset]:
        out: dict[str, Dataset] = {}
        for split, (js, img) in self.splits.items():
            if js is not None:
                out[split] = CocoInstanceDataset(js, img, self.image_size, train=split == "train",
                                                 class_agnostic=self.class_agnostic, limit=self.limit)
                if self.class_names is not None and len(out[split].class_names) != len(self.class_names):
                    raise ValueError(f"{js} has {len(out[split].class_names)} categories but class_names has "
                                     f"{len(self.class_names)}")
        out.setdefault("val", out.get("test"))
        out.setdefault("test", out.get("val"))
        if self.predict_images is not None:
            out["predict"] = ImageFolderDataset(self.predict_images, self.image_size)
        elif out.get("test") is not None:
            out["predict"] = out["test"]
        return {k: v for k, v in out.items() if v is not None}

    def _loader(self, stage: str) -> DataLoader:
        self.setup()
        if stage not in self.datasets:
            raise ValueError(f"{type(self).__name__} has no {stage} split: give {stage}_json and {stage}_images")
        train = stage == "train"
        ds = self.datasets[stage]
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          drop_last=train and len(ds) > self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=collate_instances)


class CamouflageDataModule(CocoInstanceDataModule):
    """COD10K-v3 (train + test) or NC4K (test only), found under ``root`` in OSFormer's layout.

    Args:
        root: the folder holding ``COD10K-v3/`` and/or ``NC4K/``.
        dataset: ``"cod10k"`` or ``"nc4k"``.
        class_agnostic: OSFormer's single ``"foreground"`` class (default True, as the benchmarks score).
        class_names: prompts of the classes (e.g. ``["camouflaged animal"]``); default the JSON's names.
        image_size, predict_images, batch_size, num_workers, eval_batch_size, limit: see
            :class:`CocoInstanceDataModule`.
    """

    def __init__(self, root: str, dataset: str = "cod10k", image_size: int = 512, class_agnostic: bool = True,
                 class_names: list[str] | None = None, predict_images: str | None = None, batch_size: int = 2,
                 num_workers: int = 0, eval_batch_size: int | None = None, limit: int | None = None) -> None:
        if dataset not in LAYOUTS:
            raise ValueError(f"dataset must be one of {sorted(LAYOUTS)}, got {dataset!r}")
        base = Path(root).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(f"camouflage data root {base} does not exist. Expected layout:\n{LAYOUT_TEXT}")
        paths: dict[str, tuple[str | None, str | None]] = {}
        for split in ("train", "test"):
            paths[split] = (None, None)
            for js, img in LAYOUTS[dataset].get(split, ()):
                if (base / js).is_file():
                    paths[split] = (str(base / js), str(base / img))
                    break
            else:
                if split in LAYOUTS[dataset]:
                    tried = ", ".join(js for js, _ in LAYOUTS[dataset][split])
                    raise FileNotFoundError(f"{dataset} {split} annotations not found under {base} (tried {tried}). "
                                            f"Expected layout:\n{LAYOUT_TEXT}")
        super().__init__(*paths["train"], None, None, *paths["test"], image_size=image_size,
                         class_agnostic=class_agnostic, class_names=class_names, predict_images=predict_images,
                         batch_size=batch_size, num_workers=num_workers, eval_batch_size=eval_batch_size, limit=limit)
        self.dataset = dataset
