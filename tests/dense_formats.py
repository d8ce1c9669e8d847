"""Tiny copies of the dense datasets' on-disk formats, written into a temp folder by tests.

Each ``make_*`` writes a few 48x64 (HxW) images (sizes divisible by 16, so ``test_sd`` runs on
full images and on 32- or 48-px crops) and returns the folder to pass as the DataModule's
``root``. Contents are seeded and blocky (constant 8x8 cells), so JPEG keeps the layout and
tests can check alignment; labels and depth come back from the files themselves.

    root = make_nyu(tmp_path)          # NYUv2DataModule(root, crop_size=32)
    root = make_ade20k(tmp_path)       # ADE20KDataModule(root, crop_size=32, scale=None)
    root = make_refcoco(tmp_path)      # RefCOCODataModule(root, image_size=32)
    root = make_depth_folder(tmp_path) # DepthFolderDataModule(root, crop_size=32)
    root = make_seg_folder(tmp_path)   # SegFolderDataModule(root, num_classes=4, crop_size=32)
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SIZE", "make_ade20k", "make_depth_folder", "make_nyu", "make_refcoco", "make_seg_folder",
           "REFCOCO_BOXES"]

SIZE = (48, 64)  # (H, W)
CELL = 8
# RefCOCO refs: (image index, split, (x0, y0, x1, y1) box of the referred object, segmentation kind)
REFCOCO_BOXES = [
    (0, "train", (8, 8, 40, 32), "polygon"), (0, "train", (40, 16, 60, 44), "rle"),
    (1, "train", (0, 0, 24, 24), "polygon"), (1, "val", (16, 8, 56, 40), "polygon"),
    (2, "val", (24, 16, 48, 48), "rle"), (2, "testA", (4, 4, 20, 44), "polygon"),
    (2, "testB", (30, 2, 62, 20), "polygon"),
]


def _cells(rng: np.random.Generator, low: int, high: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """(H, W) int array of constant CELLxCELL blocks with values in [low, high)."""
    h, w = size
    grid = rng.integers(low, high, size=(-(-h // CELL), -(-w // CELL)))
    return np.kron(grid, np.ones((CELL, CELL), dtype=np.int64))[:h, :w]


def _rgb(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> Image.Image:
    return Image.fromarray(np.stack([_cells(rng, 0, 256, size) for _ in range(3)], -1).astype(np.uint8), "RGB")


def _save_jpg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=100)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _depth_mm(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> np.ndarray:
    """uint16 millimetres in [300, 9999] with one invalid (0) cell."""
    depth = _cells(rng, 300, 10000, size).astype(np.uint16)
    depth[:CELL, :CELL] = 0
    return depth


def make_nyu(root: str | Path, n_train: int = 4, n_test: int = 3, seed: int = 0) -> Path:
    """BTS layout: ``sync/<scene>_<id>/`` train pairs, ``official_splits/test/<scene>/`` test pairs, split files
    (train: leading slash, 3 fields, LF; test: no slash, 3 fields, CRLF as GLPDepth's copy)."""
    root, rng = Path(root) / "nyu", np.random.default_rng(seed)
    train_scenes = ["kitchen_0028b", "living_room_0010", "study_room_0005", "bedroom_0004"]
    test_scenes = ["bathroom", "kitchen", "office"]
    lines = {"train": [], "test": []}
    for split, scenes, base, n in (("train", train_scenes, "sync", n_train), ("test", test_scenes,
                                                                          "official_splits/test", n_test)):
        for i in range(n):
            scene, num = scenes[i % len(scenes)], f"{i + 1:05d}"
            _save_jpg(_rgb(rng), root / base / scene / f"rgb_{num}.jpg")
            _save_png(_depth_mm(rng), root / base / scene / f"sync_depth_{num}.png")
            rel = f"{scene}/rgb_{num}.jpg {scene}/sync_depth_{num}.png 518.8579"
            lines[split].append("/" + rel.replace(" ", " /", 1) if split == "train" else rel)
    (root / "nyudepthv2_train_files_with_gt.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "nyudepthv2_test_files_with_gt.txt").write_bytes(("\r\n".join(lines["test"]) + "\r\n").encode())
    return root


def make_ade20k(root: str | Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    """``ADEChallengeData2016/`` with JPEG images and 8-bit greyscale annotations (0 = other, 1..150)."""
    root, rng = Path(root) / "ADEChallengeData2016", np.random.default_rng(seed)
    for folder, prefix, n in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        for i in range(n):
            name = f"{prefix}_{i + 1:08d}"
            _save_jpg(_rgb(rng), root / "images" / folder / f"{name}.jpg")
            labels = _cells(rng, 0, 5)  # mostly a few classes (and 0)
            labels[labels == 4] = 150  # the largest id occurs too
            _save_png(labels.astype(np.uint8), root / "annotations" / folder / f"{name}.png")
    return root


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with zeros) of a (H, W) {0, 1} mask."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def make_refcoco(root: str | Path, dataset: str = "refcoco", split_by: str = "unc", seed: int = 0) -> Path:
    """REFER layout: ``images/train2014/COCO_train2014_*.jpg``, ``<dataset>/refs(<split_by>).p`` (pickle
    protocol 2) and ``<dataset>/instances.json``; each ref's object is the box in :data:`REFCOCO_BOXES`,
    as a polygon or an uncompressed RLE, two sentences per ref."""
    root, rng = Path(root) / "refer", np.random.default_rng(seed)
    h, w = SIZE
    images, anns, refs = [], [], []
    for k in sorted({b[0] for b in REFCOCO_BOXES}):
        image_id = 1000 + k
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _save_jpg(_rgb(rng), root / "images" / "train2014" / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    for ref_id, (k, split, (x0, y0, x1, y1), kind) in enumerate(REFCOCO_BOXES):
        if kind == "polygon":
            seg: list | dict = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        else:
            mask = np.zeros(SIZE, np.uint8)
            mask[y0:y1, x0:x1] = 1
            seg = _rle_uncompressed(mask)
        ann_id = 5000 + ref_id
        anns.append({"id": ann_id, "image_id": 1000 + k, "category_id": 1, "segmentation": seg, "iscrowd": 0,
                     "area": float((x1 - x0) * (y1 - y0)), "bbox": [x0, y0, x1 - x0, y1 - y0]})
        sents = [{"sent_id": 2 * ref_id + j, "sent": f"object {ref_id} view {j}", "raw": f"Object {ref_id}, view {j}",
                  "tokens": ["object", str(ref_id), "view", str(j)]} for j in range(2)]
        refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": 1000 + k, "category_id": 1, "split": split,
                     "sentences": sents, "sent_ids": [s["sent_id"] for s in sents], "file_name": images[k]["file_name"]})
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": 1, "name": "thing"}]}))
    return root


def make_depth_folder(root: str | Path, n: int = 5, seed: int = 0) -> Path:
    """``images/*.png`` + ``depth/*.png`` (16-bit millimetres)."""
    root, rng = Path(root) / "depth_folder", np.random.default_rng(seed)
    for i in range(n):
        _save_png(np.asarray(_rgb(rng)), root / "images" / f"img_{i:03d}.png")
        _save_png(_depth_mm(rng), root / "depth" / f"img_{i:03d}.png")
    return root


def make_seg_folder(root: str | Path, n: int = 5, num_classes: int = 4, seed: int = 0) -> Path:
    """``images/*.jpg`` + ``masks/*.png`` (8-bit class ids 0..num_classes-1, some 255 = ignore)."""
    root, rng = Path(root) / "seg_folder", np.random.default_rng(seed)
    for i in range(n):
        _save_jpg(_rgb(rng), root / "images" / f"img_{i:03d}.jpg")
        mask = _cells(rng, 0, num_classes).astype(np.uint8)
        mask[-CELL:, -CELL:] = 255
        _save_png(mask, root / "masks" / f"img_{i:03d}.png")
    return root
