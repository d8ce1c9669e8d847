"""Image classification data in its published on-disk formats, for zero-shot evaluation.

- :class:`ImageFolderDataModule`: ``root/<class>/<image>`` folders (torchvision's ImageFolder
  layout); class names are the folder names.
- :class:`Cifar10DataModule`: CIFAR-10's python version, ``cifar-10-batches-py/`` with
  ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and ``batches.meta`` (Python 2 pickles
  with bytes keys: ``b"data"`` (N, 3072) uint8 with the R, G, B planes of 32x32 images,
  ``b"labels"``, and ``b"label_names"`` in the meta file). Download:
  https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
- The bundled model's digits: ``diffperc.data.digits.DigitsDataModule`` (held-out split for test).

Every module exposes ``classes`` (names in label order), which
:class:`~diffperc.tasks.classification.ClassificationTask` turns into prompts. Batches are
``{"image": (B, 3, S, S) float in [0, 1], "label": (B,) int64}``; images are resized as the
Diffusion Classifier's ``get_transform`` does (Li et al., ICCV 2023, arXiv 2303.16203;
diffusion-classifier eval_prob_adaptive.py:28-36): torchvision ``Resize(S, BICUBIC)`` on the
PIL image (PIL's bicubic on 8-bit pixels, so CIFAR-10's 32 px images are upsampled to 512 as
the paper's), ``CenterCrop(S)``, RGB, ``ToTensor`` (:func:`pil_resize_center_crop`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._io import IMAGE_SUFFIXES
from ..images import UnreadableImageError, open_image, to_rgb8

__all__ = ["CIFAR10_FOLDER", "Cifar10DataModule", "Cifar10Dataset", "IMAGE_SUFFIXES", "ImageFolderDataModule",
           "cifar10_classes", "cifar10_folder",
           "ImageFolderDataset", "pil_resize_center_crop", "resize_center_crop"]

CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def pil_resize_center_crop(image: Image.Image, size: int,
                           interpolation: Image.Resampling = Image.Resampling.BICUBIC) -> Tensor:
    """A PIL image -> (3, size, size) float32 in [0, 1], as torchvision's ``Resize(size)``, ``CenterCrop(size)``,
    RGB conversion and ``ToTensor`` do it (the Diffusion Classifier's ``get_transform``).

    The shorter side becomes ``size`` and the longer ``int(size * long / short)`` (torchvision
    truncates), resampled by PIL in the image's own mode and 8-bit precision; the crop starts at
    ``round((H - size) / 2)`` (Python's rounding, as torchvision); the RGB conversion comes after.
    """
    w, h = image.size
    new_short, new_long = size, int(size * max(w, h) / min(w, h))
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), interpolation)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def resize_center_crop(image: Tensor, size: int) -> Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size): shorter side to ``size`` (bicubic, antialiased), centre crop."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bicubic", align_corners=False,
                              antialias=scale < 1)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[:, top : top + size, left : left + size].clamp(0, 1).contiguous()


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


# ---------------------------------------------------------------------------- ImageFolder
class ImageFolderDataset(Dataset):
    """Images under ``root/<class folder>/``, labelled by their folder in sorted order.

    Args:
        root: a folder with one sub-folder per class.
        image_size: side S of the returned square images.
        limit: keep only the first ``limit`` images (sorted by class, then file name).
    """

    def __init__(self, root: str | Path, image_size: int = 512, limit: int | None = None) -> None:
        self.root, self.image_size = Path(root).expanduser(), image_size
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {self.root} does not exist: expected root/<class>/<image>")
        self.folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(self.folders) < 2:
            raise ValueError(f"{self.root} has {len(self.folders)} class folders; expected root/<class>/<image> "
                             "with at least two classes")
        self.samples = [(path, k) for k, name in enumerate(self.folders)
                        for path in sorted((self.root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {self.root}")
        self.samples = self.samples[:limit]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        path, label = self.samples[index]
        try:  # diffperc.images: EXIF orientation, alpha over white, allow-listed decoders
            image = pil_resize_center_crop(to_rgb8(open_image(path)), self.image_size)
        except UnreadableImageError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        return {"image": image, "label": torch.tensor(label)}


class ImageFolderDataModule(LightningDataModule):
    """An ImageFolder for zero-shot test/predict (there is no training split).

    Args:
        root: ``root/<class>/<image>`` folders.
        image_size: side S of the images (512 for SD 1.5/2 base; shorter side resized with PIL bicubic,
            centre crop).
        classes: class names in the sorted folder order; default the folder names with "_" -> " ".
        batch_size: images per batch.
        num_workers: DataLoader workers.
        limit: use at most this many images.
    """

    def __init__(self, root: str, image_size: int = 512, classes: list[str] | None = None, batch_size: int = 4,
                 num_workers: int = 0, limit: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset = ImageFolderDataset(root, image_size, limit)
        if classes is not None and len(classes) != len(self.dataset.folders):
            raise ValueError(f"classes has {len(classes)} names but {root} has {len(self.dataset.folders)} class "
                             f"folders {self.dataset.folders}")
        self.classes = list(classes) if classes is not None else [f.replace("_", " ") for f in self.dataset.folders]
        self.batch_size, self.num_workers = batch_size, num_workers

    def test_dataloader(self) -> DataLoader:
        return _loader(self.dataset, self.batch_size, self.num_workers)

    val_dataloader = predict_dataloader = test_dataloader


# ---------------------------------------------------------------------------- CIFAR-10
class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's Python 2 pickles but refuses any global other than numpy's array rebuilding."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch file")
        return super().find_class(module, name)


def _read_cifar(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR-10 file {path}: expected {CIFAR10_FOLDER}/ with data_batch_1..5, "
                                "test_batch and batches.meta (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)")
    try:
        with open(path, "rb") as f:
            data = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python pickle ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python pickle (a dict with bytes keys)")
    return data


def cifar10_folder(root: str | Path) -> Path:
    """``root`` itself if it holds ``batches.meta``, else ``root/cifar-10-batches-py``."""
    root = Path(root).expanduser()
    folder = root if (root / "batches.meta").exists() else root / CIFAR10_FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 not found at {root}: expected {root / CIFAR10_FOLDER}/ (the extracted "
                                "cifar-10-python.tar.gz) or that folder itself")
    return folder


def cifar10_classes(root: str | Path) -> list[str]:
    """The 10 class names of ``batches.meta`` (airplane, automobile, ..., truck)."""
    meta = _read_cifar(cifar10_folder(root) / "batches.meta")
    if b"label_names" not in meta:
        raise ValueError(f"{cifar10_folder(root) / 'batches.meta'} has no b'label_names'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]


class Cifar10Dataset(Dataset):
    """One split of CIFAR-10 (python version) as ``{"image": (3, S, S) in [0, 1], "label": ()}``.

    Args:
        root: ``cifar-10-batches-py`` or the folder that contains it.
        split: ``"test"`` (``test_batch``, 10,000 images) or ``"train"`` (``data_batch_1..5``).
        image_size: side S (32 native; 512 for SD 2 base as the paper: PIL bicubic upsampling).
        limit: keep only the first ``limit`` images.
    """

    def __init__(self, root: str | Path, split: str = "test", image_size: int = 32, limit: int | None = None) -> None:
        if split not in _CIFAR_SPLITS:
            raise ValueError(f"split must be one of {sorted(_CIFAR_SPLITS)}, got {split!r}")
        folder = cifar10_folder(root)
        data, labels = [], []
        for name in _CIFAR_SPLITS[split]:
            batch = _read_cifar(folder / name)
            if b"data" not in batch or b"labels" not in batch:
                raise ValueError(f"{folder / name} lacks b'data' or b'labels' (is it CIFAR-100?)")
            pixels = np.asarray(batch[b"data"], dtype=np.uint8)
            if pixels.ndim != 2 or pixels.shape[1] != 3072 or len(pixels) != len(batch[b"labels"]):
                raise ValueError(f"{folder / name}: b'data' must be (N, 3072) uint8 with N labels, got "
                                 f"{pixels.shape} and {len(batch[b'labels'])} labels")
            data.append(pixels)
            labels.extend(int(v) for v in batch[b"labels"])
        self.data = np.concatenate(data)[:limit].reshape(-1, 3, 32, 32)  # (N, 3, 32, 32) uint8, R G B planes
        self.labels = torch.tensor(labels[:limit], dtype=torch.int64)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = Image.fromarray(self.data[index].transpose(1, 2, 0))  # (32, 32, 3) uint8, as torchvision's CIFAR10
        return {"image": pil_resize_center_crop(image, self.image_size), "label": self.labels[index]}


class Cifar10DataModule(LightningDataModule):
    """CIFAR-10 (python version) for zero-shot test/predict; ``classes`` read from ``batches.meta``.

    Args:
        root: ``cifar-10-batches-py`` or the folder that contains it.
        split: the split every loader serves (``"test"``: the paper's evaluation set).
        image_size: side S of the images.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        limit: use at most this many images (the first ones of the split).
    """

    def __init__(self, root: str, split: str = "test", image_size: int = 32, batch_size: int = 4,
                 num_workers: int = 0, limit: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root, self.split, self.image_size, self.limit = root, split, image_size, limit
        self.batch_size, self.num_workers = batch_size, num_workers
        self.classes = cifar10_classes(root)
        self.dataset: Cifar10Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = Cifar10Dataset(self.root, self.split, self.image_size, self.limit)

    def test_dataloader(self) -> DataLoader:
        return _loader(self.dataset, self.batch_size, self.num_workers)

    val_dataloader = predict_dataloader = test_dataloader
