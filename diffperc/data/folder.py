"""Your own depth or segmentation data as plain folders of PNG/JPEG files.

Layout::

    <root>/
      images/<name>.jpg | .png     RGB images
      depth/<name>.png             16-bit greyscale PNG of depth x depth_scale (1000: millimetres; 0 = invalid)
      masks/<name>.png             8/16-bit greyscale or palette PNG of class ids (255 = ignore)
      train.txt, val.txt           optional lists of <name> (one a line) given as train_list / val_list

Without lists, a seeded ``val_fraction`` of the names is held out. Validation, test and
predict use the held-out items at full size; training items get a random crop (padded to
``crop_size`` where the image is smaller: image grey 0.5, depth 0 = invalid, mask 255) and a
horizontal flip.

    diffperc fit --config configs/depth/nyu_vpd_sd15.yaml \
        --data=diffperc.data.folder.DepthFolderDataModule --data.root=my_data --data.crop_size=480
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..images import load_image
from ._dense import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    DenseDataModule,
    check_dir,
    crop,
    hflip,
    pad_to,
    random_crop_box,
    read_depth_png,
    read_label_png,
    size_pair,
    split_indices,
)

__all__ = ["DepthFolderDataModule", "FolderDataset", "SegFolderDataModule", "list_names"]

LAYOUT = """<root>/
  images/<name>.jpg|.png
  depth/<name>.png      (depth data: 16-bit PNG, depth x depth_scale)
  masks/<name>.png      (segmentation data: class ids, 255 = ignore)"""


def list_names(root: Path, target: str) -> list[str]:
    """Sorted image names (stems) of ``root/images`` that have ``root/<target>/<name>.png``; errors otherwise."""
    images = check_dir(root / "images", "image folder", LAYOUT)
    targets = check_dir(root / target, f"{target} folder", LAYOUT)
    stems: dict[str, Path] = {}
    for path in sorted(images.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in stems:
                raise ValueError(f"two images named {path.stem!r} in {images}: {stems[path.stem].name}, {path.name}")
            stems[path.stem] = path
    if not stems:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}. Expected layout:\n{LAYOUT}")
    missing = [n for n in stems if not (targets / f"{n}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) have no {target} map, e.g. {targets / (missing[0] + '.png')}"
                                f". Expected layout:\n{LAYOUT}")
    return list(stems)


def _image_path(root: Path, name: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (root / "images" / f"{name}{suffix}").is_file():
            return root / "images" / f"{name}{suffix}"
    raise FileNotFoundError(f"no image {root / 'images' / name}.jpg/.png")


class FolderDataset(Dataset):
    """Items of a folder dataset: ``{"image", "depth": (1, H, W) metres, "scene": 0, "name"}`` (depth) or
    ``{"image", "mask": (H, W) int64, "name"}`` (masks).

    Args:
        root: the data folder.
        names: image stems to use.
        target: ``"depth"`` or ``"masks"``.
        train: random crop + flip.
        crop_size: training crop (H, W) or side; None = whole images.
        depth_scale: png value per metre (depth).
        num_classes: class ids must be < num_classes or 255 (masks).
    """

    def __init__(self, root: str | Path, names: Sequence[str], target: str, train: bool = False,
                 crop_size: int | Sequence[int] | None = None, depth_scale: float = 1000.0,
                 num_classes: int | None = None) -> None:
        if target not in ("depth", "masks"):
            raise ValueError(f"target must be 'depth' or 'masks', got {target!r}")
        if target == "masks" and (num_classes is None or not 1 <= num_classes <= 255):
            raise ValueError(f"num_classes must be in 1..255 for masks, got {num_classes}")
        self.root, self.names, self.target = Path(root), list(names), target
        self.train, self.crop_size = train, size_pair(crop_size, "crop_size")
        self.depth_scale, self.num_classes = depth_scale, num_classes

    def __len__(self) -> int:
        return len(self.names)

    def _read_target(self, name: str) -> Tensor:
        path = self.root / self.target / f"{name}.png"
        if self.target == "depth":
            return read_depth_png(path, self.depth_scale)  # (1, H, W)
        mask = torch.from_numpy(read_label_png(path))  # (H, W)
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            raise ValueError(f"mask {path} has class ids {sorted(mask[bad].unique().tolist())[:10]} outside "
                             f"0..{self.num_classes - 1} (num_classes={self.num_classes}; 255 = ignore)")
        return mask

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        name = self.names[index]
        image_path = _image_path(self.root, name)
        image, target = load_image(image_path), self._read_target(name)  # (3, H, W): EXIF, 16-bit, alpha handled
        if image.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"image {image_path} is {tuple(image.shape[-2:])} (HxW) but its {self.target} map is "
                             f"{tuple(target.shape[-2:])}")
        if self.train:
            if self.crop_size is not None:
                box = random_crop_box(*image.shape[-2:], self.crop_size)
                fill = 0.0 if self.target == "depth" else IGNORE_INDEX
                # grey image padding: 0 in [-1, 1], as mmseg pads after normalising and VPD pads depth crops
                image, target = pad_to(crop(image, box), self.crop_size, 0.5), pad_to(crop(target, box),
                                                                                       self.crop_size, fill)
            if torch.rand(()) < 0.5:
                image, target = hflip(image), hflip(target)
        item: dict[str, Tensor | str] = {"image": image.contiguous(), "name": name}
        if self.target == "depth":
            item.update(depth=target.contiguous(), scene=torch.tensor(0, dtype=torch.int64))
        else:
            item["mask"] = target.contiguous()
        return item


def _read_list(root: Path, path: str) -> list[str]:
    file = Path(path).expanduser()
    file = file if file.is_absolute() else root / file
    if not file.is_file():
        raise FileNotFoundError(f"list file {file} does not exist: expected one image name (no suffix) a line")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


class _FolderDataModule(DenseDataModule):
    target = ""

    def __init__(self, root: str, crop_size: int | Sequence[int] | None, train_list: str | None,
                 val_list: str | None, val_fraction: float, seed: int, batch_size: int, num_workers: int,
                 eval_batch_size: int | None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} does not exist. Expected layout:\n{LAYOUT}")
        names = list_names(self.root, self.target)
        if (train_list is None) != (val_list is None):
            raise ValueError("give both train_list and val_list, or neither (then val_fraction splits the names)")
        if train_list is not None and val_list is not None:
            self.train_names, self.val_names = _read_list(self.root, train_list), _read_list(self.root, val_list)
            unknown = sorted(set(self.train_names + self.val_names) - set(names))
            if unknown:
                raise FileNotFoundError(f"the lists name {len(unknown)} item(s) without an image and {self.target} map "
                                        f"in {self.root}, e.g. {unknown[0]!r}")
        else:
            train_idx, val_idx = split_indices(len(names), val_fraction, seed)
            self.train_names, self.val_names = [names[i] for i in train_idx], [names[i] for i in val_idx]
        if not self.train_names or not self.val_names:
            raise ValueError(f"{self.root}: {len(self.train_names)} train and {len(self.val_names)} val items; both "
                             "need at least one (add images or change val_fraction / the lists)")
        self.crop_size = size_pair(crop_size, "crop_size")

    def _datasets(self, **kwargs) -> dict[str, Dataset]:
        train = FolderDataset(self.root, self.train_names, self.target, True, self.crop_size, **kwargs)
        val = FolderDataset(self.root, self.val_names, self.target, False, self.crop_size, **kwargs)
        return {"train": train, "val": val, "test": val, "predict": val}


class DepthFolderDataModule(_FolderDataModule):
    """``images/`` + ``depth/`` (16-bit PNG) folders as a depth DataModule.

    Args:
        root: the data folder (layout in the module docstring).
        depth_scale: png value per metre (1000 = millimetres, as NYUv2; 256 for KITTI).
        crop_size: training crop (H, W) or side; None trains on whole images.
        train_list, val_list: files of image names (relative to root or absolute); both or neither.
        val_fraction: share of the names held out when no lists are given.
        seed: seed of that split.
        scene_name: the scene (prompt) name of every item (items have ``scene`` 0).
        batch_size, num_workers, eval_batch_size: see :class:`DenseDataModule`.
    """

    target = "depth"

    def __init__(self, root: str, depth_scale: float = 1000.0, crop_size: int | Sequence[int] | None = None,
                 train_list: str | None = None, val_list: str | None = None, val_fraction: float = 0.2,
                 seed: int = 0, scene_name: str = "scene", batch_size: int = 4, num_workers: int = 0,
                 eval_batch_size: int | None = None) -> None:
        super().__init__(root, crop_size, train_list, val_list, val_fraction, seed, batch_size, num_workers,
                         eval_batch_size)
        self.save_hyperparameters()
        if depth_scale <= 0:
            raise ValueError(f"depth_scale must be > 0, got {depth_scale}")
        self.depth_scale, self.scene_names = depth_scale, [scene_name]

    def build(self) -> dict[str, Dataset]:
        return self._datasets(depth_scale=self.depth_scale)


class SegFolderDataModule(_FolderDataModule):
    """``images/`` + ``masks/`` (class-id PNG) folders as a semantic segmentation DataModule.

    Args:
        root: the data folder (layout in the module docstring).
        num_classes: K; mask ids must be in 0..K-1 or 255 (ignore).
        class_names: K names in id order (prompts); default ``"class 0"``, ``"class 1"``, ...
        crop_size, train_list, val_list, val_fraction, seed: see :class:`DepthFolderDataModule`.
        batch_size, num_workers, eval_batch_size: see :class:`DenseDataModule`.
    """

    target = "masks"

    def __init__(self, root: str, num_classes: int, class_names: list[str] | None = None,
                 crop_size: int | Sequence[int] | None = None, train_list: str | None = None,
                 val_list: str | None = None, val_fraction: float = 0.2, seed: int = 0, batch_size: int = 4,
                 num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__(root, crop_size, train_list, val_list, val_fraction, seed, batch_size, num_workers,
                         eval_batch_size)
        self.save_hyperparameters()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes must be in 1..255 (255 is the ignore id), got {num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [f"class {i}" for i in range(num_classes)]

    def build(self) -> dict[str, Dataset]:
        return self._datasets(num_classes=self.num_classes)
