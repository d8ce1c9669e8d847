"""RefCOCO, RefCOCO+ and RefCOCOg (G-Ref) referring segmentation in the REFER layout.

Layout (lichengunc/refer's ``data/`` folder, as LAVT and VPD use it)::

    <root>/
      images/train2014/COCO_train2014_000000581857.jpg ...   (or train2014/, or images/mscoco/images/train2014/)
      refcoco/refs(unc).p  refcoco/instances.json
      refcoco+/refs(unc).p refcoco+/instances.json
      refcocog/refs(umd).p refcocog/instances.json          (refs(google).p: the older split)

``refs(<split_by>).p`` is the datasets' published format, a pickle: a list of refs
``{"ref_id", "ann_id", "image_id", "category_id", "split", "sentences": [{"sent", "raw", "tokens",
"sent_id"}, ...]}``. It is read with an unpickler that accepts plain Python containers and
scalars only, so a tampered file cannot run code. ``instances.json`` is COCO format; a ref's
mask is its annotation's segmentation (polygons or RLE) rasterised with pycocotools
(``pip install pycocotools`` or ``diffperc[coco]``), polygons united, as LAVT does.

Splits are the refs' ``split`` values: unc ``train``/``val``/``testA``/``testB``, umd
``train``/``val``/``test``. Items (as LAVT, Yang et al., CVPR 2022): training gives one item
per ref with a sentence drawn at random each time; evaluation gives one item per sentence.
The sentence is the ``raw`` text (``sent`` where there is none). Images and masks are resized
to ``image_size`` squared (bilinear / nearest), as LAVT and VPD; LAVT scores masks at the
original size, which differs only at resampled boundaries.
"""

from __future__ import annotations

import json
import pickle
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._dense import DenseDataModule, load_rgb, resize_image, resize_mask, size_pair

__all__ = ["RefCOCODataModule", "RefCOCODataset", "annotation_mask", "load_refs"]

DATASETS = ("refcoco", "refcoco+", "refcocog")
_IMAGE_DIRS = ("images/train2014", "train2014", "images/mscoco/images/train2014")
LAYOUT = """<root>/
  images/train2014/COCO_train2014_*.jpg   (or train2014/)
  <dataset>/refs(<split_by>).p            (refcoco, refcoco+: refs(unc).p; refcocog: refs(umd).p)
  <dataset>/instances.json                (COCO format)"""


class _PlainUnpickler(pickle.Unpickler):
    """Loads lists, dicts, strings and numbers only: any class or function reference is refused."""

    _ALLOWED = {"set", "frozenset", "bytearray", "complex"}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if module == "builtins" and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused object {module}.{name}: a refs pickle holds plain containers only")


def load_refs(path: Path) -> list[dict[str, Any]]:
    """Read a REFER ``refs(<split_by>).p`` (Python 2 or 3 pickle) -> list of ref dicts (cached per file version)."""
    if not path.is_file():
        raise FileNotFoundError(f"refs file {path} does not exist. Expected layout:\n{LAYOUT}")
    return _load_refs(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _load_refs(file: str, mtime_ns: int) -> list[dict[str, Any]]:
    path = Path(file)
    try:
        with open(path, "rb") as f:
            refs = _PlainUnpickler(f, encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a REFER refs pickle: {err}") from err
    keys = {"ref_id", "ann_id", "image_id", "split", "sentences"}
    if not isinstance(refs, list) or not refs or not all(isinstance(r, dict) and keys <= r.keys() for r in refs):
        raise ValueError(f"{path}: expected a non-empty list of refs with keys {sorted(keys)}")
    return refs


def annotation_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """COCO polygons ([[x1, y1, x2, y2, ...], ...]) or RLE -> (H, W) uint8 {0, 1}, the union of the parts."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError as err:
        raise ImportError("RefCOCO masks need pycocotools: pip install pycocotools (or diffperc[coco])") from err
    if isinstance(segmentation, list):
        rles = coco_mask.frPyObjects(segmentation, height, width)  # one RLE per polygon
        rle = coco_mask.merge(rles)
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return (coco_mask.decode(rle) > 0).astype(np.uint8)


@lru_cache(maxsize=4)
def _load_json(file: str, mtime_ns: int) -> dict[str, Any]:
    """The train/val/test datasets of one module share one parse of instances.json (tens of MB)."""
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _find_image_dir(root: Path) -> Path:
    for rel in _IMAGE_DIRS:
        if (root / rel).is_dir():
            return root / rel
    raise FileNotFoundError(f"RefCOCO: no COCO train2014 image folder under {root} (tried {', '.join(_IMAGE_DIRS)}). "
                            f"Expected layout:\n{LAYOUT}")


class RefCOCODataset(Dataset):
    """One split of RefCOCO/+/g: ``{"image": (3, S, S) in [0, 1], "mask": (S, S) int64 {0, 1}, "sentence": str,
    "name": str}`` (name ``<ref_id>_<sentence index>``).

    Args:
        root: the REFER data folder (layout in the module docstring).
        dataset: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        split_by: ``"unc"`` (RefCOCO/+), ``"umd"`` or ``"google"`` (RefCOCOg).
        split: a ``split`` value of the refs (``train``, ``val``, ``testA``, ``testB``, ``test``).
        train: one item per ref with a random sentence; False: one item per sentence.
        image_size: side S (or (H, W)) images and masks are resized to; None keeps the original size.
    """

    def __init__(self, root: str | Path, dataset: str = "refcoco", split_by: str = "unc", split: str = "val",
                 train: bool = False, image_size: int | tuple[int, int] | None = 512) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"RefCOCO root {root} does not exist. Expected layout:\n{LAYOUT}")
        self.image_dir = _find_image_dir(root)
        refs_path = root / dataset / f"refs({split_by}).p"
        refs = load_refs(refs_path)
        splits = sorted({str(r["split"]) for r in refs})
        refs = [r for r in refs if r["split"] == split and r["sentences"]]
        if not refs:
            raise ValueError(f"{refs_path} has no refs with split {split!r}; it has splits {splits}")
        self.images, self.anns = self._load_instances(root / dataset / "instances.json", refs)
        self.train, self.image_size = train, size_pair(image_size, "image_size")
        self.refs = refs
        # (ref index, sentence index); -1 = draw a sentence at random per access (training)
        self.items = [(i, -1) for i in range(len(refs))] if train else \
            [(i, j) for i, r in enumerate(refs) for j in range(len(r["sentences"]))]

    @staticmethod
    def _load_instances(path: Path, refs: list[dict]) -> tuple[dict[int, dict], dict[int, dict]]:
        if not path.is_file():
            raise FileNotFoundError(f"COCO instances file {path} does not exist. Expected layout:\n{LAYOUT}")
        coco = _load_json(str(path), path.stat().st_mtime_ns)
        if not {"images", "annotations"} <= coco.keys():
            raise ValueError(f"{path} is not COCO instances JSON: no 'images'/'annotations' keys")
        images = {img["id"]: img for img in coco["images"]}
        anns = {ann["id"]: ann for ann in coco["annotations"]}
        for ref in refs:
            if ref["ann_id"] not in anns or ref["image_id"] not in images:
                raise ValueError(f"ref {ref['ref_id']} points at annotation {ref['ann_id']} / image {ref['image_id']} "
                                 f"which {path} does not have")
        return images, anns

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        ref_idx, sent_idx = self.items[index]
        ref = self.refs[ref_idx]
        if sent_idx < 0:
            sent_idx = random.randrange(len(ref["sentences"]))
        sentence = ref["sentences"][sent_idx]
        info = self.images[ref["image_id"]]
        path = self.image_dir / info["file_name"]
        image = load_rgb(path)  # (3, H, W)
        h, w = image.shape[-2:]
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(f"image {path} is {h}x{w} (HxW) but instances.json says "
                             f"{info['height']}x{info['width']}")
        mask = torch.from_numpy(annotation_mask(self.anns[ref["ann_id"]]["segmentation"], h, w)).long()  # (H, W)
        if self.image_size is not None:
            image, mask = resize_image(image, self.image_size), resize_mask(mask, self.image_size)
        return {"image": image.contiguous(), "mask": mask.contiguous(),
                "sentence": str(sentence.get("raw") or sentence["sent"]), "name": f"{ref['ref_id']}_{sent_idx}"}


class RefCOCODataModule(DenseDataModule):
    """RefCOCO/+/g: train on ``train``; validate on ``val_split``; test on ``test_split``; predict = test.

    Args:
        root: the REFER data folder.
        dataset: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        split_by: ``"unc"`` (RefCOCO/+) or ``"umd"`` (RefCOCOg, as LAVT/VPD).
        image_size: square side of images and masks (LAVT 480, VPD 512).
        val_split, test_split: refs ``split`` values (e.g. ``testA``, ``testB``, ``test``).
        batch_size, num_workers, eval_batch_size: see :class:`DenseDataModule`.
    """

    def __init__(self, root: str, dataset: str = "refcoco", split_by: str = "unc", image_size: int = 512,
                 val_split: str = "val", test_split: str = "val", batch_size: int = 4, num_workers: int = 0,
                 eval_batch_size: int | None = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        self.root = Path(root).expanduser()
        for path in (self.root, self.root / dataset):
            if not path.is_dir():
                raise FileNotFoundError(f"RefCOCO folder {path} does not exist. Expected layout:\n{LAYOUT}")
        self.dataset, self.split_by, self.image_size = dataset, split_by, image_size
        self.val_split, self.test_split = val_split, test_split

    def build(self) -> dict[str, Dataset]:
        def make(split: str, train: bool = False) -> RefCOCODataset:
            return RefCOCODataset(self.root, self.dataset, self.split_by, split, train, self.image_size)

        test = make(self.test_split)
        return {"train": make("train", True), "val": make(self.val_split), "test": test, "predict": test}
