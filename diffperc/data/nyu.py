"""NYU Depth v2 in the BTS / GLPDepth / VPD layout: split files of (RGB, 16-bit depth PNG) pairs.

Layout (BTS's ``sync`` training set and the official 654-image Eigen test split)::

    <root>/
      nyudepthv2_train_files_with_gt.txt    "/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579"
      nyudepthv2_test_files_with_gt.txt     "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579"
      sync/<scene>_<id>/rgb_*.jpg, sync_depth_*.png           training pairs
      official_splits/test/<scene>/rgb_*.jpg, sync_depth_*.png  test pairs

Split lines hold 2 or 3 whitespace-separated fields (RGB path, depth path, optional focal
length), with or without a leading slash, LF or CRLF endings (VPD's and GLPDepth's copies).
Paths are resolved against ``<root>/sync`` (train) and ``<root>/official_splits/test`` (test)
where those folders exist, else against ``<root>``. Depth PNGs are uint16 millimetres:
depth_m = png / 1000, 0 = no measurement.

Scenes (VPD's depth prompts, Zhao et al., ICCV 2023, arXiv 2303.02153): the image's folder
name with its trailing id removed (``kitchen_0028b`` -> ``kitchen``) is matched against the
27 names of VPD's ``depth/nyu_class_list.json`` (:data:`NYU_SCENES`). ``scene_match="vpd"``
takes, as VPD does, the first name in list order that is a substring (so ``study_room`` ->
``study`` and ``office_kitchen`` -> ``kitchen``, as in VPD's training); ``"exact"`` needs the
name itself. A scene that matches nothing is an error naming the split file and line (VPD
asserts too): a silent fallback would give wrong prompts.

Training items follow VPD's ``depth/dataset/base_dataset.py`` (GLPDepth's): on the full uint8
image, CutDepth on every ``cut_depth_interval``-th item this dataset copy serves (VPD: every 4th,
counted per data-loader worker), then albumentations' horizontal flip (p=0.5), random crop to
``crop_size`` (VPD 480x480) and, with ``color_aug``, RandomBrightnessContrast, RandomGamma and
HueSaturationValue (each p=0.5), random numbers drawn from Python's ``random`` in VPD's order
(:func:`~diffperc.data._augment.nyu_vpd_augment`). Test items: the full 480x640 image.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._augment import cut_depth, nyu_vpd_augment
from ._dense import DenseDataModule, load_rgb_u8, read_depth_png, size_pair, u8_to_tensor

__all__ = ["NYU_SCENES", "NYUv2DataModule", "NYUv2Dataset", "read_split_file", "scene_index"]

NYU_SCENES = ("printer_room", "bathroom", "living_room", "study", "conference_room", "study_room", "kitchen",
              "home_office", "bedroom", "dinette", "playroom", "indoor_balcony", "laundry_room", "basement",
              "excercise_room", "foyer", "home_storage", "cafe", "furniture_store", "office_kitchen",
              "student_lounge", "dining_room", "reception_room", "computer_lab", "classroom", "office", "bookstore")
LAYOUT = """<root>/
  nyudepthv2_train_files_with_gt.txt   lines "/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579"
  nyudepthv2_test_files_with_gt.txt    lines "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579"
  sync/<scene>_<id>/rgb_*.jpg, sync_depth_*.png              (train; 16-bit PNG, millimetres)
  official_splits/test/<scene>/rgb_*.jpg, sync_depth_*.png   (test)"""
_SCENE_ID = re.compile(r"_\d+[a-z]?$")


def scene_index(folder: str, scene_match: str = "vpd") -> int:
    """Index into :data:`NYU_SCENES` of an image folder name (``"kitchen_0028b"`` -> 6); -1 if none matches."""
    name = _SCENE_ID.sub("", folder)
    if scene_match == "exact":
        return NYU_SCENES.index(name) if name in NYU_SCENES else -1
    if scene_match != "vpd":
        raise ValueError(f"scene_match must be 'vpd' or 'exact', got {scene_match!r}")
    return next((i for i, scene in enumerate(NYU_SCENES) if scene in name), -1)


def read_split_file(path: Path, scene_match: str = "vpd") -> list[tuple[str, str, int]]:
    """A BTS/VPD split file -> [(rgb relative path, depth relative path, scene index)], leading '/' removed."""
    if not path.is_file():
        raise FileNotFoundError(f"NYUv2 split file {path} does not exist. Expected layout:\n{LAYOUT}")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):  # splitlines: LF and CRLF
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (2, 3) or fields[1] == "None":
            raise ValueError(f"{path}, line {lineno}: expected 'rgb_path depth_path [focal]', got {line.strip()!r}")
        rgb, depth = fields[0].lstrip("/"), fields[1].lstrip("/")
        folder = Path(rgb).parent.name
        scene = scene_index(folder, scene_match)
        if scene < 0:
            raise ValueError(f"{path}, line {lineno}: scene folder {folder!r} matches none of the 27 NYU scene names "
                             f"({scene_match!r} rule): {', '.join(NYU_SCENES)}")
        records.append((rgb, depth, scene))
    if not records:
        raise ValueError(f"NYUv2 split file {path} has no entries; expected lines 'rgb_path depth_path [focal]'")
    return records


class NYUv2Dataset(Dataset):
    """One NYUv2 split: ``{"image": (3, H, W) in [0, 1], "depth": (1, H, W) metres (0 = invalid),
    "scene": () int64 index into NYU_SCENES, "name": str}``.

    Args:
        split_file: the BTS/VPD list of pairs.
        image_dir: the folder the list's paths are relative to.
        train: VPD's training augmentation (module docstring); False returns full images.
        crop_size: (H, W) or side of training crops (VPD: 480x480).
        color_aug: VPD's colour augmentation on training images.
        depth_scale: png value per metre (1000: millimetres).
        scene_match: ``"vpd"`` or ``"exact"`` (see the module docstring).
        cut_depth_interval: CutDepth on every n-th training item (VPD: 4); 0 = off.
        rng: source of the training randomness (``.random()``, ``.uniform()``); None = Python's
            ``random`` module, as VPD (seeded per worker by ``seed_everything(workers=True)``).
    """

    def __init__(self, split_file: str | Path, image_dir: str | Path, train: bool = False,
                 crop_size: int | Sequence[int] = (480, 480), color_aug: bool = True, depth_scale: float = 1000.0,
                 scene_match: str = "vpd", cut_depth_interval: int = 4, rng: Any = None) -> None:
        if cut_depth_interval < 0:
            raise ValueError(f"cut_depth_interval must be >= 0 (0 = no CutDepth), got {cut_depth_interval}")
        self.records = read_split_file(Path(split_file), scene_match)
        self.image_dir, self.train = Path(image_dir), train
        self.crop_size = size_pair(crop_size, "crop_size")
        self.color_aug, self.depth_scale = color_aug, depth_scale
        self.cut_depth_interval, self.rng = cut_depth_interval, rng
        self._count = 0  # VPD's self.count: items served by this copy of the dataset (one per worker)
        rgb, depth, _ = self.records[0]
        for rel in (rgb, depth):
            if not (self.image_dir / rel).is_file():
                raise FileNotFoundError(f"{split_file} lists {rel}, but {self.image_dir / rel} does not exist. "
                                        f"Expected layout:\n{LAYOUT}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        rgb, depth_rel, scene = self.records[index]
        image = load_rgb_u8(self.image_dir / rgb)  # (H, W, 3) uint8
        depth = read_depth_png(self.image_dir / depth_rel, 1.0)[0].numpy()  # (H, W) png units (VPD: mm)
        if image.shape[:2] != depth.shape:
            raise ValueError(f"image {self.image_dir / rgb} is {image.shape[:2]} (HxW) but its depth map "
                             f"{self.image_dir / depth_rel} is {depth.shape}")
        if self.train:
            rng = self.rng if self.rng is not None else random
            if self.cut_depth_interval and self._count % self.cut_depth_interval == 0:
                image = cut_depth(image, depth, rng)
            image, depth = nyu_vpd_augment(image, depth, self.crop_size, rng, self.color_aug)
            self._count += 1
        depth_m = torch.from_numpy(np.ascontiguousarray(depth) / np.float32(self.depth_scale))[None]
        return {"image": u8_to_tensor(image), "depth": depth_m.float().contiguous(),
                "scene": torch.tensor(scene, dtype=torch.int64), "name": rgb}


def _resolve(root: Path, path: str | None, default: str) -> Path:
    """An explicit path (absolute, or relative to root), else ``root/default`` if it exists, else root."""
    if path is not None:
        p = Path(path).expanduser()
        return p if p.is_absolute() else root / p
    return root / default if (root / default).is_dir() else root


class NYUv2DataModule(DenseDataModule):
    """NYUv2 depth: train on the train split list, validate/test/predict on the test list (there is no val split).

    Args:
        root: dataset folder (layout in the module docstring).
        train_split, test_split: split files, relative to ``root`` or absolute.
        train_dir, test_dir: folders the split paths are relative to (default ``<root>/sync`` and
            ``<root>/official_splits/test`` where they exist, else ``<root>``).
        crop_size: training crop (H, W) or side; VPD: 480x480.
        color_aug: VPD's colour augmentation of training crops (brightness/contrast, gamma, HSV).
        depth_scale: png value per metre.
        scene_match: ``"vpd"`` (first substring match, as VPD) or ``"exact"``.
        cut_depth_interval: CutDepth on every n-th training item of each worker (VPD: 4); 0 = off.
        batch_size, num_workers, eval_batch_size: see :class:`DenseDataModule` (VPD: 3 per GPU).

    Attributes:
        scene_names: the 27 scene names the items' ``scene`` indexes.
    """

    def __init__(self, root: str, train_split: str = "nyudepthv2_train_files_with_gt.txt",
                 test_split: str = "nyudepthv2_test_files_with_gt.txt", train_dir: str | None = None,
                 test_dir: str | None = None, crop_size: int | Sequence[int] = (480, 480), color_aug: bool = True,
                 depth_scale: float = 1000.0, scene_match: str = "vpd", cut_depth_interval: int = 4,
                 batch_size: int = 3, num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"NYUv2 root {self.root} does not exist. Expected layout:\n{LAYOUT}")
        self.train_split, self.test_split = _resolve(self.root, train_split, ""), _resolve(self.root, test_split, "")
        self.train_dir = _resolve(self.root, train_dir, "sync")
        self.test_dir = _resolve(self.root, test_dir, "official_splits/test")
        for split in (self.train_split, self.test_split):
            if not split.is_file():
                raise FileNotFoundError(f"NYUv2 split file {split} does not exist. Expected layout:\n{LAYOUT}")
        self.crop_size = size_pair(crop_size, "crop_size")
        self.color_aug, self.depth_scale, self.scene_match = color_aug, depth_scale, scene_match
        self.cut_depth_interval = cut_depth_interval
        self.scene_names = list(NYU_SCENES)

    def build(self) -> dict[str, Dataset]:
        train = NYUv2Dataset(self.train_split, self.train_dir, True, self.crop_size, self.color_aug, self.depth_scale,
                             self.scene_match, self.cut_depth_interval)
        test = NYUv2Dataset(self.test_split, self.test_dir, False, self.crop_size, False, self.depth_scale,
                            self.scene_match)
        return {"train": train, "val": test, "test": test, "predict": test}
