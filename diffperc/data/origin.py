"""Origin-identification data: translated queries paired with the origin images they came from.

For ID² (Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion Models",
ICML 2025) and its dataset OriPID (origins from DISC21; train = 100,000 origins x 20 prompts
of SD 2 translations; test queries from 7 generators). Two ways to give the pairs:

- a **pairs CSV** with header ``query,origin_id``: ``query`` is an image path (relative to the
  CSV's folder, or absolute), ``origin_id`` the file name without extension of an image in
  the **origins folder**;
- an **ID²-named folder** of translations, as in the released training code
  (``dg/datasets/sd2_d_multi_feature.py``): ``<letter><origin>_<k>.<ext>``, e.g.
  ``T000123_4.jpg`` is translation 4 of origin ``000123``; the origins folder then holds
  ``<letter><origin>.<ext>`` or ``<origin>.<ext>``.

Batches are ``{"image": (B, 3, S, S) in [0, 1], "label": (B,) origin class, "role": (B,)
0 = origin (gallery) / 1 = query, "key": list of B paths}`` (``key`` feeds the task's
VAE-feature cache). Training samples origins in groups of ``num_instances`` translations per
origin (ID²: batch 512 = 128 origins x 4).
"""

from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["IMAGE_SUFFIXES", "IdentitySampler", "OriginImageDataset", "OriginPairsDataModule", "list_origins",
           "read_pairs"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_ID2_NAME = re.compile(r"^[A-Za-z]+(?P<origin>\d+)_(?P<k>\d+)$")
_ORIGIN_PREFIX = re.compile(r"^[A-Za-z]+(?=\d+$)")


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_pairs(source: str | Path) -> list[tuple[Path, str]]:
    """(query image, origin id) pairs from a ``query,origin_id`` CSV or an ID²-named folder."""
    source = Path(source)
    if source.is_dir():
        pairs = []
        for p in _images(source):
            m = _ID2_NAME.match(p.stem)
            if m is None:
                raise ValueError(f"{p}: translations in a folder must be named <letter><origin>_<k>.<ext> "
                                 "(ID²: T000123_4.jpg); use a query,origin_id CSV for other names")
            pairs.append((p, m["origin"]))
        return pairs
    if not source.is_file():
        raise FileNotFoundError(f"pairs file {str(source)!r} does not exist (expected a CSV with header "
                                "query,origin_id or a folder of ID²-named translations)")
    with open(source, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"query", "origin_id"} <= set(reader.fieldnames):
            raise ValueError(f"{source}: the header must have the columns query,origin_id; got {reader.fieldnames}")
        pairs = []
        for line, row in enumerate(reader, start=2):
            query, origin = (row["query"] or "").strip(), (row["origin_id"] or "").strip()
            if not query or not origin:
                raise ValueError(f"{source}, line {line}: empty query or origin_id")
            path = Path(query) if Path(query).is_absolute() else source.parent / query
            pairs.append((path, origin))
    if not pairs:
        raise ValueError(f"{source} has no pairs")
    return pairs


def list_origins(folder: str | Path) -> dict[str, Path]:
    """Origin id -> image path for every image of ``folder`` (id = file stem; ``R000123`` also answers ``000123``)."""
    origins: dict[str, Path] = {}
    for p in _images(Path(folder)):
        if p.stem in origins:
            raise ValueError(f"{origins[p.stem].name} and {p.name} have the same origin id {p.stem!r}")
        origins[p.stem] = p
    for stem, p in list(origins.items()):
        bare = _ORIGIN_PREFIX.sub("", stem)
        origins.setdefault(bare, p)
    return origins


class OriginImageDataset(Dataset):
    """Images with an origin label and a role: ``{"image", "label", "role", "key"}``.

    Args:
        items: (path, label, role) triples; role 0 = origin, 1 = query/translation.
        image_size: side S the images are resized to (bilinear; aspect not kept, as ID²).
    """

    def __init__(self, items: list[tuple[Path, int, int]], image_size: int) -> None:
        if not items:
            raise ValueError("no images")
        self.items, self.image_size = items, image_size
        # Set by OriginIDTask once every image's VAE features are cached: items then carry an
        # empty image and no file is read (ID² likewise trains on precomputed features).
        self.features_only = False

    def __len__(self) -> int:
        return len(self.items)

    @property
    def keys(self) -> list[str]:
        return [str(path) for path, _, _ in self.items]

    def __getitem__(self, index: int) -> dict[str, object]:
        path, label, role = self.items[index]
        if self.features_only:
            return {"image": torch.zeros(0), "label": torch.tensor(label), "role": torch.tensor(role), "key": str(path)}
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        image = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0  # (3, S, S)
        return {"image": image, "label": torch.tensor(label), "role": torch.tensor(role), "key": str(path)}

    @property
    def labels(self) -> list[int]:
        return [label for _, label, _ in self.items]


class IdentitySampler(Sampler[int]):
    """Indices grouped ``num_instances`` per identity, identities in random order (re-id "PK" sampling).

    An identity with fewer samples is sampled with replacement. With DataLoader's batch
    size a multiple of ``num_instances`` every batch holds batch/num_instances identities.

    Args:
        labels: identity of each dataset index.
        num_instances: consecutive indices per identity.
        length: indices per epoch (passes over the shuffled identities repeat to reach it);
            default one pass, ``num_identities x num_instances``.
        seed: base seed (each epoch reshuffles).
    """

    def __init__(self, labels: list[int], num_instances: int = 4, length: int | None = None, seed: int = 0) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            self.by_label[label].append(i)
        self.num_instances, self.seed, self.epoch = num_instances, seed, 0
        self.length = length or len(self.by_label) * num_instances

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        left = self.length
        while left > 0:
            labels = list(self.by_label)
            rng.shuffle(labels)
            for label in labels:
                idx = self.by_label[label]
                picks = rng.sample(idx, self.num_instances) if len(idx) >= self.num_instances else \
                    [rng.choice(idx) for _ in range(self.num_instances)]
                yield from picks[:left]
                left -= len(picks)
                if left <= 0:
                    return


class OriginPairsDataModule(LightningDataModule):
    """Train on (translation, origin) pairs; validate/test by retrieving each query's origin.

    Args:
        train_pairs: CSV ``query,origin_id`` or a folder of ID²-named translations.
        train_origins: folder of the training origins (needed if ``include_origins``).
        val_pairs, val_origins: held-out queries and the gallery they search (every image of
            ``val_origins``, distractors included); None skips validation.
        test_pairs, test_origins: same for ``diffperc test``; default: the val ones.
        image_size: side S of the images (ID²: 256).
        batch_size: training batch (ID²: 512), a multiple of ``num_instances``.
        num_instances: translations per origin in a training batch (ID²: 4).
        include_origins: also train on each origin image itself, as one more sample of its class.
        samples_per_epoch: training samples per epoch (ID²: 2,000 iterations x 512 = 1,024,000);
            default one pass over the origins, ``num_instances`` each.
        eval_batch_size: batch size of validation and test.
        num_workers: DataLoader workers.
        seed: sampling seed.
    """

    def __init__(self, train_pairs: str, train_origins: str | None = None, val_pairs: str | None = None,
                 val_origins: str | None = None, test_pairs: str | None = None, test_origins: str | None = None,
                 image_size: int = 256, batch_size: int = 64, num_instances: int = 4, include_origins: bool = True,
                 samples_per_epoch: int | None = None, eval_batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})")
        if include_origins and train_origins is None:
            raise ValueError("include_origins=True needs train_origins (the folder of origin images), or set it False")
        if (val_pairs is None) != (val_origins is None):
            raise ValueError("give both val_pairs and val_origins, or neither")
        self.save_hyperparameters()
        self.train_set: OriginImageDataset | None = None
        self.eval_sets: dict[str, OriginImageDataset] = {}
        self._classes: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of training origins (the CosFace classes)."""
        if self._classes is None:
            self._classes = sorted({o for _, o in read_pairs(self.hparams.train_pairs)})
        return len(self._classes)

    def _train_items(self) -> list[tuple[Path, int, int]]:
        pairs = read_pairs(self.hparams.train_pairs)
        self._classes = sorted({o for _, o in pairs})
        label = {o: i for i, o in enumerate(self._classes)}
        items = [(p, label[o], 1) for p, o in pairs]
        if self.hparams.include_origins:
            origins = list_origins(self.hparams.train_origins)
            missing = [o for o in self._classes if o not in origins]
            if missing:
                raise FileNotFoundError(f"{len(missing)} training origins are not in {self.hparams.train_origins}: "
                                        f"{missing[:5]} (or set include_origins=False)")
            items += [(origins[o], label[o], 0) for o in self._classes]
        return items

    @staticmethod
    def _eval_items(pairs_path: str, origins_dir: str) -> list[tuple[Path, int, int]]:
        """Every origin image (role 0, its own label) and every query (role 1, its origin's label)."""
        origins = list_origins(origins_dir)  # id (and prefix-less alias) -> path
        label = {p: i for i, p in enumerate(sorted(set(origins.values())))}
        pairs = read_pairs(pairs_path)
        missing = sorted({o for _, o in pairs if o not in origins})
        if missing:
            raise FileNotFoundError(f"{len(missing)} origins of {pairs_path} are not in {origins_dir}: {missing[:5]}")
        return [(p, i, 0) for p, i in label.items()] + [(q, label[origins[o]], 1) for q, o in pairs]

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = OriginImageDataset(self._train_items(), hp.image_size)
        if hp.val_pairs is not None and "val" not in self.eval_sets:
            self.eval_sets["val"] = OriginImageDataset(self._eval_items(hp.val_pairs, hp.val_origins), hp.image_size)
        test_pairs, test_origins = hp.test_pairs or hp.val_pairs, hp.test_origins or hp.val_origins
        if stage in (None, "test") and test_pairs is not None and "test" not in self.eval_sets:
            self.eval_sets["test"] = OriginImageDataset(self._eval_items(test_pairs, test_origins), hp.image_size)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        sampler = IdentitySampler(self.train_set.labels, hp.num_instances, hp.samples_per_epoch, hp.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def _eval_loader(self, name: str) -> DataLoader:
        if name not in self.eval_sets:
            raise ValueError(f"no {name} data: give {name}_pairs and {name}_origins (or val_* for both)")
        return DataLoader(self.eval_sets[name], batch_size=self.hparams.eval_batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if "val" in self.eval_sets else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test" if "test" in self.eval_sets else "val")

