"""Synthetic depth scenes whose depth can be read off the image, for learning checks on a CPU.

Each scene (a pure function of ``seed`` and its index) is a slanted plane, depth rising
linearly along a random direction from ``d_near`` to ``d_far``, with a fronto-parallel box
in front of it at a random depth. The image is a grey-level texture (uniform in
[1 - texture, 1]) shaded by depth: ``image = texture * (1 - 0.75 * (depth - min_depth) /
(max_depth - min_depth))``, the same in the three channels up to the texture, so a model that
averages out the texture recovers the depth (the mean shading error is under
``texture / 2`` in relative brightness). Small sizes (32 or 64 px) let a few hundred steps
with the bundled ``digits`` backbone run on a CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._dense import DenseDataModule

__all__ = ["SyntheticDepthDataModule", "SyntheticDepthDataset", "make_scene"]


def make_scene(seed: int, image_size: int = 32, min_depth: float = 1.0, max_depth: float = 5.0,
               texture: float = 0.15) -> tuple[Tensor, Tensor]:
    """One scene -> (image (3, S, S) float32 in [0, 1], depth (1, S, S) float32 in [min_depth, max_depth])."""
    gen = torch.Generator().manual_seed(seed)
    u = lambda: float(torch.rand((), generator=gen))  # noqa: E731
    s = image_size
    ys, xs = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    angle = 2 * torch.pi * u()
    ramp = torch.cos(torch.tensor(angle)) * xs + torch.sin(torch.tensor(angle)) * ys  # (S, S)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min()).clamp_min(1e-6)
    span = max_depth - min_depth
    near = min_depth + span * 0.4 * u()
    far = min_depth + span * (0.6 + 0.4 * u())
    depth = near + (far - near) * ramp
    h, w = int(s * (0.25 + 0.3 * u())), int(s * (0.25 + 0.3 * u()))
    top, left = int((s - h) * u()), int((s - w) * u())
    box_depth = min_depth + (depth[top : top + h, left : left + w].min().item() - min_depth) * u()
    depth[top : top + h, left : left + w] = box_depth
    shade = 1 - 0.75 * (depth - min_depth) / span  # (S, S) in [0.25, 1]
    tex = 1 - texture * torch.rand(3, s, s, generator=gen)
    return (tex * shade).clamp(0, 1).float(), depth[None].float()


class SyntheticDepthDataset(Dataset):
    """``num`` scenes ``make_scene(seed * 1_000_003 + offset + i)`` as depth items
    ``{"image": (3, S, S), "depth": (1, S, S) metres, "scene": 0, "name": "synthetic_<i>"}``.
    """

    def __init__(self, num: int, image_size: int = 32, seed: int = 0, offset: int = 0, min_depth: float = 1.0,
                 max_depth: float = 5.0, texture: float = 0.15) -> None:
        if num < 1 or image_size < 4 or not 0 < min_depth < max_depth:
            raise ValueError(f"need num >= 1, image_size >= 4 and 0 < min_depth < max_depth, got {num}, {image_size}, "
                             f"{min_depth}, {max_depth}")
        self.num, self.image_size, self.seed, self.offset = num, image_size, seed, offset
        self.min_depth, self.max_depth, self.texture = min_depth, max_depth, texture

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        if not 0 <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} scenes")
        image, depth = make_scene(self.seed * 1_000_003 + self.offset + index, self.image_size, self.min_depth,
                                  self.max_depth, self.texture)
        return {"image": image, "depth": depth, "scene": torch.tensor(0, dtype=torch.int64),
                "name": f"synthetic_{self.offset + index:05d}"}


class SyntheticDepthDataModule(DenseDataModule):
    """Seeded synthetic depth scenes: ``num_train`` for training, ``num_val`` others for val/test/predict.

    Args:
        num_train, num_val: scene counts (disjoint seeds).
        image_size: side S (a multiple of the backbone's size multiple: 8 for ``digits``, 16 for ``test_sd``).
        min_depth, max_depth: depth range in metres.
        texture: texture strength (0 = depth exactly from brightness).
        seed: base seed; the same seed gives the same scenes.
        batch_size, num_workers, eval_batch_size: see :class:`DenseDataModule`.

    Attributes:
        scene_names: ``["room"]`` (every item has scene 0).
    """

    def __init__(self, num_train: int = 256, num_val: int = 64, image_size: int = 32, min_depth: float = 1.0,
                 max_depth: float = 5.0, texture: float = 0.15, seed: int = 0, batch_size: int = 16,
                 num_workers: int = 0, eval_batch_size: int | None = None) -> None:
        super().__init__(batch_size, num_workers, eval_batch_size)
        self.save_hyperparameters()
        self.num_train, self.num_val, self.image_size, self.seed = num_train, num_val, image_size, seed
        self.min_depth, self.max_depth, self.texture = min_depth, max_depth, texture
        self.scene_names = ["room"]

    def build(self) -> dict[str, Dataset]:
        args = dict(image_size=self.image_size, seed=self.seed, min_depth=self.min_depth, max_depth=self.max_depth,
                    texture=self.texture)
        train = SyntheticDepthDataset(self.num_train, offset=0, **args)
        val = SyntheticDepthDataset(self.num_val, offset=self.num_train, **args)
        return {"train": train, "val": val, "test": val, "predict": val}
