"""Linear probe: classify images from globally average-pooled backbone features.

The simplest real task, used to check a backbone's features (is the class linearly
decodable?) and to test the command line end to end:

    diffperc fit --config configs/probe/digits_probe_digits.yaml
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ._base import PerceptionTask

__all__ = ["ProbeTask"]


class ProbeTask(PerceptionTask):
    """Linear classifier on the channel-wise means of every feature map, concatenated.

    As in MAE's linear probing (He et al., CVPR 2022, arXiv 2111.06377), the pooled features
    go through a BatchNorm without affine parameters first, so layers of very different
    scales train at one learning rate; at inference it is a fixed affine map, so the probe
    stays linear. Training needs batches of 2 or more.

    Batches are dicts ``{"image": (B, 3, H, W) in [0, 1], "label": (B,) int64}``.

    Args:
        backbone, backbone_kwargs, optimizer, backbone_lr_mult: see :class:`PerceptionTask`.
        num_classes: number of classes K.
        prompt: the one prompt every image is encoded with ("" = unconditional).
    """

    def __init__(
        self, backbone: str = "digits", backbone_kwargs: dict[str, Any] | None = None, num_classes: int = 10,
        prompt: str = "", optimizer: OptimizerCallable = torch.optim.AdamW, backbone_lr_mult: float = 0.1,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, optimizer, backbone_lr_mult)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.prompt = prompt
        dim = sum(self.backbone.feature_info.channels())
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
        # One metric object per stage (their states must not mix); ModuleDict keys cannot be "train".
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(num_classes) for _ in range(3))

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> class logits (B, K)."""
        feats = self.backbone(images, prompts=self.prompt).features
        pooled = torch.cat([f.float().mean(dim=(2, 3)) for f in feats], dim=1)  # (B, sum C_i)
        return self.head(pooled)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        acc = getattr(self, f"{stage}_acc")
        acc(logits, batch["label"])
        bs = len(batch["label"])
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """{"logits": (B, K), "pred": (B,)} for ``diffperc predict``."""
        logits = self(batch["image"])
        return {"logits": logits, "pred": logits.argmax(1)}
