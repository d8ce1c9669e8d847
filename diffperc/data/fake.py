"""Random data in the batch schema of the tasks, for smoke tests and config checks (no files).

    diffperc fit --config configs/probe/digits_probe_digits.yaml \
        --model.init_args.backbone=test_sd --data=diffperc.data.fake.FakeDataModule --trainer.fast_dev_run=1
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["FakeDataModule", "FakeDataset"]


class FakeDataset(Dataset):
    """Seeded uniform-noise images with random labels: ``{"image": (3, S, S) in [0, 1], "label": ()}``.

    Args:
        num_samples: number of items.
        image_size: side S (``test_sd`` needs multiples of 16, ``digits`` of 8).
        num_classes: labels are drawn from 0 .. num_classes - 1.
        seed: the same seed gives the same items.
    """

    def __init__(self, num_samples: int = 16, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> None:
        if num_samples < 1 or image_size < 1 or num_classes < 1:
            raise ValueError(f"num_samples, image_size and num_classes must be >= 1, got "
                             f"{num_samples}, {image_size}, {num_classes}")
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(num_samples, 3, image_size, image_size, generator=gen)  # (N, 3, S, S)
        self.labels = torch.randint(0, num_classes, (num_samples,), generator=gen)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class FakeDataModule(LightningDataModule):
    """A :class:`FakeDataset` for every stage (train, val, test and predict use different seeds).

    Args:
        num_samples: items per stage.
        image_size: side of the images.
        num_classes: number of label values.
        batch_size: items per batch.
        seed: base seed.
    """

    def __init__(self, num_samples: int = 16, image_size: int = 32, num_classes: int = 10, batch_size: int = 4,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_samples, self.image_size, self.num_classes = num_samples, image_size, num_classes
        self.batch_size, self.seed = batch_size, seed

    def _loader(self, offset: int, shuffle: bool = False) -> DataLoader:
        data = FakeDataset(self.num_samples, self.image_size, self.num_classes, self.seed + offset)
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(2)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(3)
