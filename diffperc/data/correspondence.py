"""Semantic correspondence benchmarks in their published on-disk formats: SPair-71k and PF-Pascal.

SPair-71k (Min et al., arXiv 1908.10543; layout as released, cf. ANCHORS.md A5)::

    SPair-71k/PairAnnotation/{trn,val,test}/<pair_id>-<src>-<trg>:<category>.json
    SPair-71k/JPEGImages/<category>/<name>.jpg
    SPair-71k/ImageAnnotation/<category>/<name>.json        (not needed: pairs carry the keypoints)

Pair JSON: ``src_imsize``/``trg_imsize`` are [W, H, 3] (width first), ``*_kps`` int [x, y]
lists, ``kps_ids`` strings, ``*_bndbox`` [x1, y1, x2, y2]. PCK reference: the target bbox.

PF-Pascal (Ham et al., "Proposal Flow", CVPR 2016; pair lists of CNNGeometric / NCNet /
HPF)::

    PF-PASCAL/JPEGImages/<name>.jpg
    PF-PASCAL/Annotations/<class>/<name>.mat   (scipy .mat: ``kps`` (K, 2) with NaN rows, ``bbox`` (1, 4))
    PF-PASCAL/{test,val,trn,train}_pairs[_pf_pascal].csv   (or ../image_pairs/<split>_pairs.csv)

CSV: ``source_image,target_image,class`` (1-based PASCAL class index), then either
``XA,YA,XB,YB`` (semicolon-separated floats in one field; test) or ``flip`` (no keypoints:
they come from the .mat files, keeping keypoints annotated in both images). Coordinates are
used as stored, as the reference evaluations do. PCK reference: the target image size.

Items are dicts (see :class:`PairDataset`); :func:`collate_pairs` pads keypoints into a batch.

Resizing: DIFT resizes both images to 768x768 (PIL bicubic; Tsingularity/dift
src/models/dift_sd.py:276-278). SD-DINO letterboxes (``letterbox=True``): the longer side is
resized to the target with PIL Lanczos, the aspect kept, and the image centred on a zero
canvas, once to 960 for SD and once, from the original, to 840 for DINOv2
(``dino_image_size``); keypoints go into the frame as x * s + offset (Junyi42/sd-dino
utils/utils_correspondence.py:13-31, pck_spair_pascal.py:23-46, 195-197).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["CorrespondenceDataModule", "PASCAL_CLASSES", "PFPascalDataset", "PairDataset", "SPairDataset",
           "collate_pairs", "letterbox"]

PASCAL_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                  "tvmonitor")
_SPAIR_LAYOUT = ("PairAnnotation/{trn,val,test}/<pair_id>-<src>-<trg>:<category>.json and "
                 "JPEGImages/<category>/<name>.jpg")
_PF_LAYOUT = ("JPEGImages/<name>.jpg, Annotations/<class>/<name>.mat and a pair list <split>_pairs.csv "
              "(or <split>_pairs_pf_pascal.csv, ../image_pairs/<split>_pairs.csv)")


def _size_arg(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or any(not isinstance(v, int) or v < 1 for v in hw):
        raise ValueError(f"image_size must be a positive int, (height, width) or None, got {image_size!r}")
    return hw


def letterbox(img: Image.Image, size: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """SD-DINO's ``resize(img, size, resize=True, to_pil=True, edge=False)`` and its keypoint frame.

    The longer side becomes ``size`` (PIL Lanczos), the other ``round(size * short / long)``
    (NumPy rounding, half to even), and the image is centred on a black ``size`` x ``size``
    canvas (utils_correspondence.py:16-31).

    Returns:
        The canvas and the frame (s, s, offset_x, offset_y): a point (x, y) of ``img`` is at
        (x * s + offset_x, y * s + offset_y) with s = size / max(W, H) (pck_spair_pascal.py:23-43).
    """
    w, h = img.size
    scale = size / max(w, h)
    if h <= w:  # utils_correspondence.py:20-25
        new = img.resize((size, int(np.around(size * h / w))), Image.Resampling.LANCZOS)
        off_x, off_y = 0, (size - new.height) // 2
    else:  # :26-31
        new = img.resize((int(np.around(size * w / h)), size), Image.Resampling.LANCZOS)
        off_x, off_y = (size - new.width) // 2, 0
    canvas = Image.new("RGB", (size, size))
    canvas.paste(new, (off_x, off_y))
    return canvas, (scale, scale, float(off_x), float(off_y))


def open_rgb(path: str | Path, what: str) -> Image.Image:
    """Open an image file as RGB; ``what`` (e.g. ``"SRC image"``) starts the error messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be read: {err}") from err


def _check_inside(kps: np.ndarray, hw: tuple[int, int], what: str) -> None:
    h, w = hw
    bad = ~((kps[:, 0] >= 0) & (kps[:, 0] <= w) & (kps[:, 1] >= 0) & (kps[:, 1] <= h))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}: {int(bad.sum())} keypoint(s) outside the {h}x{w} (HxW) image, e.g. #{i} at "
                         f"(x, y) = ({kps[i, 0]:g}, {kps[i, 1]:g}); expected 0 <= x <= {w}, 0 <= y <= {h}")


class PairDataset(Dataset):
    """Image pairs with corresponding keypoints; subclasses fill ``self.records``.

    Each item is a dict:

    - ``src_image``, ``trg_image``: (3, h, w) float32 in [0, 1], resized to ``image_size``
      (bicubic), or letterboxed into it (``letterbox``).
    - ``src_image_dino``, ``trg_image_dino`` (only with ``dino_image_size``): the original
      image resized (or letterboxed) again, to the DINOv2 input size.
    - ``src_frame``, ``trg_frame`` (and ``*_frame_dino``): (4,) float64 (sx, sy, ox, oy): an
      original point (x, y) is at (x * sx + ox, y * sy + oy) in the resized image.
    - ``src_id``, ``trg_id``: str identifying the image (and flip), for feature caches.
    - ``src_kps``, ``trg_kps``: (N, 2) float32 (x, y) in pixels of the resized images.
    - ``src_bbox``, ``trg_bbox``: (4,) float32 (x1, y1, x2, y2) in pixels of the resized images.
    - ``src_kps_orig``, ``trg_kps_orig``, ``src_bbox_orig``, ``trg_bbox_orig``: the same in
      original pixels (matching and PCK are done there, as DIFT does).
    - ``src_size``, ``trg_size``: (2,) int64 original (H, W).
    - ``pck_ref``: (4,) float32 box whose longer side is the PCK reference, in original pixels:
      the target bbox, or the whole target image (0, 0, W, H).
    - ``kps_ids``: (N,) int64 keypoint ids (-1 where unknown); ``category``, ``name``: str.

    Args:
        image_size: (h, w) or a side to resize both images to; None keeps the original size
            (then batches need batch_size 1).
        letterbox: keep the aspect ratio: Lanczos-resize the longer side to ``image_size`` (a
            square side) and centre the image on a zero canvas, as SD-DINO does.
        dino_image_size: also give each image at this side for DINOv2 (SD-DINO: 840),
            prepared from the original the same way (letterboxed or resized).
    """

    pck_ref = "bbox"

    def __init__(self, image_size: int | Sequence[int] | None = 768, letterbox: bool = False,
                 dino_image_size: int | None = None) -> None:
        self.image_size = _size_arg(image_size)
        if letterbox and (self.image_size is None or self.image_size[0] != self.image_size[1]):
            raise ValueError(f"letterbox=True needs a square image_size (one int, e.g. 960), got {image_size!r}")
        if dino_image_size is not None and (not isinstance(dino_image_size, int) or dino_image_size < 1):
            raise ValueError(f"dino_image_size must be a positive int or None, got {dino_image_size!r}")
        self.letterbox, self.dino_image_size = letterbox, dino_image_size
        self.records: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def categories(self) -> list[str]:
        return sorted({r["category"] for r in self.records})

    def _side(self, rec: dict[str, Any], side: str) -> dict[str, Tensor]:
        """Load, check, flip and resize one image of a pair; keys without the src_/trg_ prefix."""
        what = f"pair {rec['name']} ({rec['source']})"
        img = open_rgb(rec[f"{side}_path"], f"{what}: {side} image")
        w, h = img.size
        if rec.get(f"{side}_hw") is not None and tuple(rec[f"{side}_hw"]) != (h, w):
            raise ValueError(f"{what}: {side} image {rec[f'{side}_path']} is {h}x{w} (HxW) but the annotation says "
                             f"{rec[f'{side}_hw'][0]}x{rec[f'{side}_hw'][1]}")
        kps = np.asarray(rec[f"{side}_kps"], dtype=np.float64).reshape(-1, 2)
        _check_inside(kps, (h, w), f"{what}, {side} keypoints")
        bbox = np.asarray(rec[f"{side}_bbox"] if rec.get(f"{side}_bbox") is not None else (0, 0, w, h), np.float64)
        if rec.get("flip"):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            kps = np.stack([w - kps[:, 0], kps[:, 1]], axis=1)
            bbox = np.array([w - bbox[2], bbox[1], w - bbox[0], bbox[3]])
        view, frame = self._prepare(img, self.image_size or (h, w))
        sx, sy, ox, oy = frame
        out = {
            "image": view,
            "kps": torch.from_numpy(kps * [sx, sy] + [ox, oy]).float(),
            "bbox": torch.from_numpy(bbox * [sx, sy, sx, sy] + [ox, oy, ox, oy]).float(),
            "kps_orig": torch.from_numpy(kps).float(), "bbox_orig": torch.from_numpy(bbox).float(),
            "size": torch.tensor([h, w], dtype=torch.int64), "frame": torch.tensor(frame, dtype=torch.float64),
            "id": f"{rec[f'{side}_path']}" + (":flipped" if rec.get("flip") else ""),
        }
        if self.dino_image_size is not None:
            out["image_dino"], frame_dino = self._prepare(img, (self.dino_image_size,) * 2)
            out["frame_dino"] = torch.tensor(frame_dino, dtype=torch.float64)
        return out

    def _prepare(self, img: Image.Image, size: tuple[int, int]) -> tuple[Tensor, tuple[float, float, float, float]]:
        """Resize (bicubic) or letterbox ``img`` to ``size``: (3, h, w) float32 in [0, 1] and its frame."""
        w, h = img.size
        if self.letterbox:
            img, frame = letterbox(img, size[0])
        else:
            if (size[0], size[1]) != (h, w):
                img = img.resize((size[1], size[0]), Image.BICUBIC)
            frame = (size[1] / w, size[0] / h, 0.0, 0.0)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous(), frame

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        item: dict[str, Any] = {}
        for side in ("src", "trg"):
            item.update({f"{side}_{k}": v for k, v in self._side(rec, side).items()})
        if len(item["src_kps"]) != len(item["trg_kps"]):
            raise ValueError(f"pair {rec['name']} ({rec['source']}): {len(item['src_kps'])} source but "
                             f"{len(item['trg_kps'])} target keypoints")
        trg_h, trg_w = item["trg_size"].tolist()
        item["pck_ref"] = item["trg_bbox_orig"] if self.pck_ref == "bbox" else torch.tensor([0.0, 0, trg_w, trg_h])
        ids = rec.get("kps_ids")
        item["kps_ids"] = torch.tensor(ids if ids is not None else [-1] * len(item["src_kps"]), dtype=torch.int64)
        item["category"], item["name"] = rec["category"], rec["name"]
        return item


def _limit(records: list[dict[str, Any]], categories: Sequence[str] | None, per_category: int | None,
           known: Sequence[str], what: str) -> list[dict[str, Any]]:
    """Keep the given categories (checked against ``known``) and the first ``per_category`` pairs of each."""
    if categories is not None:
        unknown = sorted(set(categories) - set(known))
        if unknown:
            raise ValueError(f"categories {unknown} are not in {what}; known: {sorted(set(known))}")
        records = [r for r in records if r["category"] in set(categories)]
    if per_category is not None:
        if per_category < 1:
            raise ValueError(f"max_pairs_per_category must be >= 1 or None, got {per_category}")
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for r in records:
            seen[r["category"]] += 1
            if seen[r["category"]] <= per_category:
                kept.append(r)
        records = kept
    return records


def _sample(records: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """SD-DINO's per-category draw: a fresh ``np.random.seed(seed)`` and ``choice(n, k)`` per category."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r)
    out = []
    for cat in sorted(by_cat):
        pairs = sorted(by_cat[cat], key=lambda r: r["name"])
        out += [pairs[i] for i in np.random.RandomState(seed).choice(len(pairs), k)]
    return out


class SPairDataset(PairDataset):
    """SPair-71k pairs of one split (see the module docstring for the layout).

    Args:
        root: the ``SPair-71k`` folder.
        split: ``"test"``, ``"val"`` or ``"trn"`` (``"train"`` is accepted).
        image_size: see :class:`PairDataset`.
        categories: keep only these categories (None: all 18).
        max_pairs_per_category: keep the first k pairs (by file name) of each category.
        sample_per_category: draw k pairs per category as SD-DINO's ``--SAMPLE k`` does
            (``np.random.seed(sample_seed)`` per category, then ``np.random.choice(n, k)``, with
            replacement, over the category's pairs sorted by file name; pck_spair_pascal.py:48-52);
            None = all pairs (the papers' setting).
        sample_seed: SD-DINO's ``--SEED`` (42).
        letterbox, dino_image_size: see :class:`PairDataset`.

    Pairs are ordered by category, then file name (as DIFT and SD-DINO loop over them), so
    the images of one category come together.
    """

    pck_ref = "bbox"

    def __init__(self, root: str | Path, split: str = "test", image_size: int | Sequence[int] | None = 768,
                 categories: Sequence[str] | None = None, max_pairs_per_category: int | None = None,
                 sample_per_category: int | None = None, sample_seed: int = 42, letterbox: bool = False,
                 dino_image_size: int | None = None) -> None:
        super().__init__(image_size, letterbox, dino_image_size)
        self.root = Path(root).expanduser()
        splits = {"trn": "trn", "train": "trn", "val": "val", "test": "test"}
        if split not in splits:
            raise ValueError(f"split must be one of 'trn', 'val', 'test' (SPair-71k folder names), got {split!r}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"SPair-71k root {self.root} does not exist; expected a folder with {_SPAIR_LAYOUT}")
        pair_dir = self.root / "PairAnnotation" / splits[split]
        files = sorted(pair_dir.glob("*.json")) if pair_dir.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no pair annotations in {pair_dir}; expected {_SPAIR_LAYOUT} under {self.root}")
        records = sorted((self._read(f) for f in files), key=lambda r: (r["category"], r["name"]))
        records = _limit(records, categories, max_pairs_per_category, [r["category"] for r in records],
                         f"SPair-71k {split}")
        if sample_per_category is not None:
            if sample_per_category < 1:
                raise ValueError(f"sample_per_category must be >= 1 or None, got {sample_per_category}")
            records = _sample(records, sample_per_category, sample_seed)
        self.records = records

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            ann = json.loads(path.read_text())
            src_w, src_h = ann["src_imsize"][:2]  # width first
            trg_w, trg_h = ann["trg_imsize"][:2]
            cat = ann["category"]
            rec = {"name": path.stem, "source": str(path), "category": cat,
                   "src_path": self.root / "JPEGImages" / cat / ann["src_imname"],
                   "trg_path": self.root / "JPEGImages" / cat / ann["trg_imname"],
                   "src_hw": (int(src_h), int(src_w)), "trg_hw": (int(trg_h), int(trg_w)),
                   "src_kps": ann["src_kps"], "trg_kps": ann["trg_kps"],
                   "src_bbox": ann["src_bndbox"], "trg_bbox": ann["trg_bndbox"],
                   "kps_ids": [int(k) for k in ann["kps_ids"]]}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a SPair-71k pair annotation ({type(err).__name__}: {err}); expected "
                             "keys src_imname, trg_imname, src_imsize [W, H, 3], src_kps, trg_kps, src_bndbox, "
                             "trg_bndbox, kps_ids, category") from err
        if not (len(rec["src_kps"]) == len(rec["trg_kps"]) == len(rec["kps_ids"])):
            raise ValueError(f"{path}: src_kps, trg_kps and kps_ids have different lengths "
                             f"({len(rec['src_kps'])}, {len(rec['trg_kps'])}, {len(rec['kps_ids'])})")
        return rec


class PFPascalDataset(PairDataset):
    """PF-Pascal pairs from a CSV pair list (see the module docstring for the layout).

    Args:
        root: the PF-Pascal folder holding ``JPEGImages/`` (and ``Annotations/``).
        split: ``"test"``, ``"val"`` or ``"trn"``/``"train"``: picks the pair list.
        image_size: see :class:`PairDataset`.
        pairs_file: an explicit CSV pair list instead of searching by ``split``.
        categories, max_pairs_per_category: as :class:`SPairDataset`.
        pck_ref: ``"image"`` (the convention: target image size) or ``"bbox"`` (needs .mat files).
        flip: apply the pair list's ``flip`` column (horizontal flip of both images, training lists).
        letterbox, dino_image_size: see :class:`PairDataset`.
    """

    def __init__(self, root: str | Path, split: str = "test", image_size: int | Sequence[int] | None = 768,
                 pairs_file: str | Path | None = None, categories: Sequence[str] | None = None,
                 max_pairs_per_category: int | None = None, pck_ref: str = "image", flip: bool = True,
                 letterbox: bool = False, dino_image_size: int | None = None) -> None:
        super().__init__(image_size, letterbox, dino_image_size)
        self.root = Path(root).expanduser()
        if pck_ref not in ("image", "bbox"):
            raise ValueError(f"pck_ref must be 'image' or 'bbox', got {pck_ref!r}")
        self.pck_ref, self.flip = pck_ref, flip
        if not self.root.is_dir():
            raise FileNotFoundError(f"PF-Pascal root {self.root} does not exist; expected a folder with {_PF_LAYOUT}")
        self.pairs_file = Path(pairs_file).expanduser() if pairs_file else self._find_pairs(split)
        if not self.pairs_file.is_file():
            raise FileNotFoundError(f"PF-Pascal pair list {self.pairs_file} does not exist")
        records = [self._record(row, i) for i, row in enumerate(self._rows())]
        self.records = _limit(records, categories, max_pairs_per_category, PASCAL_CLASSES, "PASCAL VOC")

    def _find_pairs(self, split: str) -> Path:
        names = {"trn": ("trn", "train"), "train": ("train", "trn"), "val": ("val",), "test": ("test",)}
        if split not in names:
            raise ValueError(f"split must be 'test', 'val', 'trn' or 'train', got {split!r}")
        tried = [d / f"{s}{suffix}.csv" for s in names[split] for d in (self.root, self.root / "image_pairs",
                 self.root.parent / "image_pairs") for suffix in ("_pairs", "_pairs_pf_pascal")]
        for path in tried:
            if path.is_file():
                return path
        raise FileNotFoundError(f"no PF-Pascal {split} pair list; looked for {[str(p) for p in tried]} "
                                "(or pass pairs_file=)")

    def _rows(self) -> list[dict[str, str]]:
        with open(self.pairs_file, newline="") as f:  # newline="": CRLF and LF files read alike
            reader = csv.DictReader(f)
            need = {"source_image", "target_image", "class"}
            if not reader.fieldnames or not need <= set(reader.fieldnames):
                raise ValueError(f"{self.pairs_file}: header {reader.fieldnames} lacks {sorted(need)}")
            return list(reader)

    def _record(self, row: dict[str, str], i: int) -> dict[str, Any]:
        where = f"{self.pairs_file} row {i + 2}"  # 1-based line number after the header
        try:
            cls = int(row["class"])
        except ValueError as err:
            raise ValueError(f"{where}: class {row['class']!r} is not an int") from err
        if not 1 <= cls <= len(PASCAL_CLASSES):
            raise ValueError(f"{where}: class {cls} is not a 1-based PASCAL class index (1-20)")
        cat = PASCAL_CLASSES[cls - 1]
        rec: dict[str, Any] = {"name": f"{Path(row['source_image']).stem}-{Path(row['target_image']).stem}:{cat}",
                               "source": where, "category": cat,
                               "src_path": self._image(row["source_image"]), "trg_path": self._image(row["target_image"]),
                               "flip": self.flip and row.get("flip", "0").strip() == "1"}
        mats = [self.root / "Annotations" / cat / f"{Path(row[k]).stem}.mat" for k in ("source_image", "target_image")]
        if row.get("XA"):
            src, trg = (self._points(row, a, b, where) for a, b in (("XA", "YA"), ("XB", "YB")))
            if len(src) != len(trg):
                raise ValueError(f"{where}: {len(src)} source but {len(trg)} target keypoints")
            boxes = [self._mat(m)[1] if m.is_file() else None for m in mats]
        else:
            (src_all, src_box), (trg_all, trg_box) = (self._mat(m, where) for m in mats)
            keep = np.isfinite(src_all).all(1) & np.isfinite(trg_all).all(1)
            src, trg, boxes = src_all[keep], trg_all[keep], [src_box, trg_box]
        if self.pck_ref == "bbox" and boxes[1] is None:
            raise FileNotFoundError(f"{where}: pck_ref='bbox' needs the target bbox from {mats[1]}, which is missing")
        rec.update(src_kps=src, trg_kps=trg, src_bbox=boxes[0], trg_bbox=boxes[1])
        return rec

    def _image(self, rel: str) -> Path:
        """CSV paths are like ``PF-dataset-PASCAL/JPEGImages/x.jpg``: try root/rel, root/../rel, root/JPEGImages/x.jpg."""
        candidates = [self.root / rel, self.root.parent / rel, self.root / "JPEGImages" / Path(rel).name]
        return next((c for c in candidates if c.is_file()), candidates[-1])

    @staticmethod
    def _points(row: dict[str, str], kx: str, ky: str, where: str) -> np.ndarray:
        try:
            xs, ys = ([float(v) for v in row[k].split(";") if v.strip()] for k in (kx, ky))
        except ValueError as err:
            raise ValueError(f"{where}: {kx}/{ky} must be semicolon-separated numbers ({err})") from err
        if len(xs) != len(ys):
            raise ValueError(f"{where}: {kx} has {len(xs)} values but {ky} has {len(ys)}")
        return np.stack([xs, ys], axis=1) if xs else np.zeros((0, 2))

    @staticmethod
    def _mat(path: Path, where: str = "") -> tuple[np.ndarray, np.ndarray | None]:
        """``kps`` (K, 2) with NaN rows and ``bbox`` (4,) of a PF-Pascal annotation .mat."""
        if not path.is_file():
            raise FileNotFoundError(f"{where}: keypoint annotation {path} does not exist (the pair list has no "
                                    f"XA/YA/XB/YB columns, so keypoints come from Annotations/<class>/<name>.mat)")
        from scipy.io import loadmat

        try:
            mat = loadmat(str(path))
            kps = np.asarray(mat["kps"], dtype=np.float64).reshape(-1, 2)
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(f"{path} is not a PF-Pascal annotation with a 'kps' (K, 2) array: {err}") from err
        bbox = np.asarray(mat["bbox"], dtype=np.float64).reshape(-1)[:4] if "bbox" in mat else None
        return kps, bbox


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch pair items: images stacked (same size required), keypoints padded with a ``kps_valid`` mask.

    Returns the item keys batched (``*_kps*`` (B, N_max, 2) zero-padded, ``kps_ids`` padded
    with -1, strings as lists) plus ``kps_valid`` (B, N_max) bool.
    """
    if not items:
        raise ValueError("cannot collate an empty list of pairs")
    shapes = {tuple(it[k].shape) for it in items for k in ("src_image", "trg_image")}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes in one batch: {sorted(shapes)}; set the dataset's image_size "
                         "(e.g. 768) or use batch_size=1")
    n_max = max(len(it["src_kps"]) for it in items)
    batch: dict[str, Any] = {"kps_valid": torch.zeros(len(items), n_max, dtype=torch.bool)}
    for i, it in enumerate(items):
        batch["kps_valid"][i, : len(it["src_kps"])] = True
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], str):
            batch[key] = vals
        elif key.endswith(("_kps", "_kps_orig", "kps_ids")):
            pad = -1 if key == "kps_ids" else 0
            out = torch.full((len(items), n_max, *vals[0].shape[1:]), pad, dtype=vals[0].dtype)
            for i, v in enumerate(vals):
                out[i, : len(v)] = v
            batch[key] = out
        else:
            batch[key] = torch.stack(vals)
    return batch


class CorrespondenceDataModule(LightningDataModule):
    """SPair-71k or PF-Pascal pairs for ``diffperc test`` (and fit/validate for trained matchers).

    Args:
        dataset: ``"spair"`` or ``"pf_pascal"``.
        root: the dataset folder (``SPair-71k`` or the PF-Pascal folder with ``JPEGImages/``).
        image_size: side (or (h, w)) both images are resized to (DIFT: 768).
        test_split, val_split, train_split: split names (SPair: test/val/trn).
        categories: keep only these categories; None = all.
        max_pairs_per_category: first k pairs of each category (quick runs); None = all pairs
            (the papers' setting).
        sample_per_category, sample_seed: SPair-71k only: SD-DINO's ``--SAMPLE k`` draw (its
            default is 20 per category, with replacement); None = all pairs.
        letterbox: keep the aspect ratio and zero-pad (SD-DINO) instead of resizing (DIFT).
        dino_image_size: also prepare each image at this side for DINOv2 (SD-DINO: 840).
        batch_size, num_workers: DataLoader settings.
    """

    def __init__(self, dataset: str = "spair", root: str = "data/SPair-71k", image_size: int | tuple[int, int] = 768,
                 test_split: str = "test", val_split: str = "val", train_split: str = "trn",
                 categories: list[str] | None = None, max_pairs_per_category: int | None = None,
                 sample_per_category: int | None = None, sample_seed: int = 42, letterbox: bool = False,
                 dino_image_size: int | None = None, batch_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        if dataset not in ("spair", "pf_pascal"):
            raise ValueError(f"dataset must be 'spair' or 'pf_pascal', got {dataset!r}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.save_hyperparameters()
        self.splits = {"test": test_split, "val": val_split, "train": train_split}
        self.datasets: dict[str, PairDataset] = {}

    def make_dataset(self, split: str) -> PairDataset:
        hp = self.hparams
        common = {"categories": hp.categories, "max_pairs_per_category": hp.max_pairs_per_category,
                  "letterbox": hp.letterbox, "dino_image_size": hp.dino_image_size}
        if hp.dataset == "spair":
            return SPairDataset(hp.root, split, hp.image_size, sample_per_category=hp.sample_per_category,
                                sample_seed=hp.sample_seed, **common)
        if hp.sample_per_category is not None:
            raise ValueError("sample_per_category is SD-DINO's SPair-71k draw; PF-Pascal uses all pairs (set it to null)")
        return PFPascalDataset(hp.root, split, hp.image_size, **common)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for key in wanted.get(stage, ("test",)):
            if key not in self.datasets:
                self.datasets[key] = self.make_dataset(self.splits[key])

    def _loader(self, key: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.datasets[key], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, collate_fn=collate_pairs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
