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
(``pip install pycocotools`` or ``diffperc[coco]``); where an object has several polygons, the pixels
covered by exactly one of them (VPD and LAVT keep the polygon sum == 1; see :func:`annotation_mask`).

Splits are the refs' ``split`` values: unc ``train``/``val``/``testA``/``testB``, umd
``train``/``val``/``test``. Items (as LAVT, Yang et al., CVPR 2022): training gives one item
per ref with a sentence drawn at random each time; evaluation gives one item per sentence.
The sentence is the cleaned ``sent`` text (lower case, punctuation removed), as VPD's
``refer/data/dataset_refer_clip.py`` tokenises it; ``sentence_field="raw"`` gives the annotators'
original text. Images and masks are resized to ``image_size`` squared with Pillow (bilinear with
Pillow's antialiasing / nearest), exactly as VPD's ``refer/transforms.py`` ``Resize`` does through
torchvision, and VPD scores the masks at that size (``refer/test.py``).
"""

from __future__ import annotations

import json
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ._dense import DenseDataModule, size_pair, u8_to_tensor

__all__ = ["RefCOCODataModule", "RefCOCODataset", "annotation_mask", "load_refs"]

DATASETS = ("refcoco", "refcoco+", "refcocog")
SENTENCE_FIELDS = ("sent", "raw")
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


def annotation_mask(segmentation: list | dict, height: int, width: int, overlaps: str = "vpd") -> np.ndarray:
    """COCO polygons ([[x1, y1, x2, y2, ...], ...]) or RLE -> (H, W) uint8 {0, 1} mask.

    Args:
        overlaps: how several polygons of one object combine. ``"vpd"``: pixels covered by
            exactly one polygon (VPD's ``refer/refer/refer.py`` ``getMask`` sums the polygon
            masks and ``refer/data/dataset_refer_clip.py`` keeps the pixels equal to 1, as LAVT);
            ``"union"``: every covered pixel. An RLE is one mask either way.
    """
    if overlaps not in ("vpd", "union"):
        raise ValueError(f"overlaps must be 'vpd' or 'union', got {overlaps!r}")
    try:
        from pycocotools import mask as coco_mask
    except ImportError as err:
        raise ImportError("RefCOCO masks need pycocotools: pip install pycocotools (or diffperc[coco])") from err
    if isinstance(segmentation, list):
        rles = coco_mask.frPyObjects(segmentation, height, width)  # one RLE per polygon
        if overlaps == "union":
            return (coco_mask.decode(coco_mask.merge(rles)) > 0).astype(np.uint8)
        return (coco_mask.decode(rles).astype(np.int64).sum(axis=2) == 1).astype(np.uint8)
    rle = coco_mask.frPyObjects(segmentation, height, width) if isinstance(segmentation.get("counts"), list) \
        else segmentation
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
        sentence_field: ``"sent"`` (cleaned text, VPD) or ``"raw"`` (original text; ``sent`` where a
            sentence has no ``raw``).
    """

    def __init__(self, root: str | Path, dataset: str = "refcoco", split_by: str = "unc", split: str = "val",
                 train: bool = False, image_size: int | tuple[int, int] | None = 512,
                 sentence_field: str = "sent") -> None:
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if sentence_field not in SENTENCE_FIELDS:
            raise ValueError(f"sentence_field must be one of {SENTENCE_FIELDS}, got {sentence_field!r}")
        self.sentence_field = sentence_field
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
            sent_idx = int(np.random.choice(len(ref["sentences"])))  # VPD dataset_refer_clip.py:113
        sentence = ref["sentences"][sent_idx]
        info = self.images[ref["image_id"]]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        w, h = image.size
        if (info.get("height", h), info.get("width", w)) != (h, w):
            raise ValueError(f"image {path} is {h}x{w} (HxW) but instances.json says "
                             f"{info['height']}x{info['width']}")
        mask = Image.fromarray(annotation_mask(self.anns[ref["ann_id"]]["segmentation"], h, w))  # (H, W) {0, 1}
        if self.image_size is not None and self.image_size != (h, w):
            size = (self.image_size[1], self.image_size[0])  # Pillow takes (W, H)
            image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        text = sentence["sent"] if self.sentence_field == "sent" else (sentence.get("raw") or sentence["sent"])
        return {"image": u8_to_tensor(np.asarray(image, dtype=np.uint8)),
                "mask": torch.from_numpy(np.array(mask, dtype=np.int64)), "sentence": str(text),
                "name": f"{ref['ref_id']}_{sent_idx}"}


class RefCOCODataModule(DenseDataModule):
    """RefCOCO/+/g: train on ``train``; validate on ``val_split``; test on ``test_split``; predict = test.

    Args:
        root: the REFER data folder.
        dataset: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        split_by: ``"unc"`` (RefCOCO/+) or ``"umd"`` (RefCOCOg, as LAVT/VPD).
        image_size: square side of images and masks (LAVT 480, VPD 512).
        val_split, test_split: refs ``split`` values (e.g. ``testA``, ``testB``, ``test``).
        sentence_field: ``"sent"`` (VPD) or ``"raw"`` (see :class:`RefCOCODataset`).
        batch_size, num_workers, eval_batch_size: see :class:`DenseDataModule` (VPD: 4 per GPU x 8).
    """

    def __init__(self, root: str, dataset: str = "refcoco", split_by: str = "unc", image_size: int = 512,
                 val_split: str = "val", test_split: str = "val", sentence_field: str = "sent", batch_size: int = 4,
                 num_workers: int = 0, eval_batch_size: int | None = None) -> None:
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
        if sentence_field not in SENTENCE_FIELDS:
            raise ValueError(f"sentence_field must be one of {SENTENCE_FIELDS}, got {sentence_field!r}")
        self.sentence_field = sentence_field

    def build(self) -> dict[str, Dataset]:
        def make(split: str, train: bool = False) -> RefCOCODataset:
            return RefCOCODataset(self.root, self.dataset, self.split_by, split, train, self.image_size,
                                  self.sentence_field)

        test = make(self.test_split)
        return {"train": make("train", True), "val": make(self.val_split), "test": test, "predict": test}
