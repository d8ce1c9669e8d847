"""Monocular metric depth, VPD recipe (Zhao et al., ICCV 2023, arXiv 2303.02153; repo wl-zhao/VPD ``depth/``).

The UNet (t = 1, no noise, unscaled posterior-mode latents, fine-tuned at a low lr) is
conditioned on one token per image: the embedding of the image's scene (NYUv2: 27 scenes) refined
by VPD's text adapter; its four decoder taps go to :class:`~diffperc.heads.depth.VPDDepthHead`
(fused map cropped to the unpadded image before decoding, sigmoid x max_depth). Loss: SiLog
(lambda 0.5, square-root form). Evaluation as VPD's ``test.sh``: flip TTA, optional shift
windows, Eigen crop, 1e-3 < gt < 10 m (ANCHORS.md section 1 and A6).

    diffperc fit  --config configs/depth/nyu_vpd_sd15.yaml
    diffperc test --config configs/depth/nyu_vpd_sd15.yaml --ckpt_path <...>.ckpt
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from PIL import Image
from torch import Tensor

from .. import viz
from ..heads.depth import VPDDepthHead
from ..heads.vpd import TextAdapter
from ..losses import silog_loss
from ..metrics import DepthMetrics
from ._dense import DenseTask

__all__ = ["DepthTask"]

_NYU_SIZE = (480, 640)


class _AutoCropDepthMetrics(DepthMetrics):
    """:class:`DepthMetrics` whose crop is chosen per batch: ``"auto"`` = Eigen on 480 x 640 ground truth."""

    def __init__(self, min_depth: float, max_depth: float, crop_mode: str) -> None:
        super().__init__(min_depth, max_depth, None)
        self.crop_mode = crop_mode

    def update(self, pred: Tensor, target: Tensor) -> None:
        auto = self.crop_mode == "auto" and tuple(target.shape[-2:]) == _NYU_SIZE
        self.crop = "eigen" if self.crop_mode == "eigen" or auto else None
        super().update(pred, target)


class DepthTask(DenseTask):
    """VPD depth: scene-prompted UNet features -> VPDDepthHead, SiLog loss, AbsRel/RMSE/... metrics.

    Batches (``NYUv2DataModule``, ``DepthFolderDataModule``, ``SyntheticDepthDataModule``):
    ``{"image": (B, 3, H, W) in [0, 1], "depth": (B, 1, H, W) metres (0 = missing),
    "scene": (B,) int64 index into the scene names, "name": list of B str}``. Without ``scene``
    every image gets scene 0.

    Args:
        backbone, backbone_kwargs, optimizer, backbone_lr_mult: see :class:`PerceptionTask`
            (VPD: ``sd15``; ``backbone_kwargs=None`` = :data:`~diffperc.tasks._dense.VPD_BACKBONE`;
            AdamW, UNet at 0.01x).
        max_depth: output range (0, max_depth) metres (VPD NYUv2: 10).
        min_depth_eval, max_depth_eval: ground truth evaluated where min < gt < max (VPD: 1e-3, 10).
        eval_crop: ``"auto"`` = the Eigen crop when the ground truth is 480 x 640 (NYUv2's native
            size), else none; ``"eigen"`` always (scaled to the size; see ``eigen_crop_mask``);
            ``"none"`` never.
        flip_test: at val/test/predict, average with the un-flipped prediction of the flipped image.
        shift_windows: at val/test/predict, n >= 2 square windows (side = image height) evenly
            spaced across a wider image, predictions averaged by overlap count (VPD: 2 windows of
            480 x 480 over 480 x 640); 0 = whole image at once.
        scene_names: the scene names ``scene`` indexes; None = the datamodule's ``scene_names``
            (else one generic scene, "room").
        templates: prompt templates averaged per scene; None = the 80 ImageNet templates (VPD).
        prompt_max_length: tokens per template prompt (VPD: 20).
        class_embeddings_path: a (S, D) table to use instead of computing one from the scene
            names, e.g. VPD's released ``depth/nyu_class_embeddings.pth`` (rows in ``NYU_SCENES`` order).
        silog_lambda: lambda of the SiLog loss (VPD: 0.5).
        neck_channels, deconv_channels, num_deconv, decoder_channels, num_upsample: head sizes
            (VPD: 1536, 32, 3, 192, 2).
        lr_schedule ... ramp_fraction, output_dir: see :class:`~diffperc.tasks._dense.DenseTask`.
        optimizer_groups: ``"vpd_depth"`` (VPD's ``optimizer.py``: 1-d and bias parameters without
            weight decay, the UNet at ``backbone_lr_mult``).
        save_raw: ``predict`` also writes ``<name>_mm.png``, 16-bit depth in millimetres.
    """

    def __init__(
        self, backbone: str = "sd15", backbone_kwargs: dict[str, Any] | None = None, max_depth: float = 10.0,
        min_depth_eval: float = 1e-3, max_depth_eval: float = 10.0,
        eval_crop: Literal["auto", "eigen", "none"] = "auto", flip_test: bool = True, shift_windows: int = 0,
        scene_names: list[str] | None = None, templates: list[str] | None = None, prompt_max_length: int = 20,
        class_embeddings_path: str | None = None, silog_lambda: float = 0.5, neck_channels: int = 1536,
        deconv_channels: int = 32, num_deconv: int = 3, decoder_channels: int = 192, num_upsample: int = 2,
        optimizer: OptimizerCallable = torch.optim.AdamW, backbone_lr_mult: float = 0.01,
        lr_schedule: str = "vpd_depth", warmup_steps: int = 0, warmup_ratio: float = 1e-6, poly_power: float = 0.9,
        min_lr_ratio: float = 0.06, ramp_fraction: float = 0.48, output_dir: str | None = None,
        optimizer_groups: str = "vpd_depth", save_raw: bool = True,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, optimizer, backbone_lr_mult, lr_schedule, warmup_steps,
                         warmup_ratio, poly_power, min_lr_ratio, ramp_fraction, output_dir, optimizer_groups)
        if eval_crop not in ("auto", "eigen", "none"):
            raise ValueError(f"eval_crop must be 'auto', 'eigen' or 'none', got {eval_crop!r}")
        if shift_windows < 0 or shift_windows == 1:
            raise ValueError(f"shift_windows must be 0 (off) or >= 2, got {shift_windows}")
        if not 0 < max_depth:
            raise ValueError(f"max_depth must be > 0, got {max_depth}")
        self.max_depth, self.flip_test, self.shift_windows = float(max_depth), flip_test, shift_windows
        self.scene_names = list(scene_names) if scene_names is not None else None
        self.templates, self.prompt_max_length, self.silog_lambda = templates, prompt_max_length, silog_lambda
        self.class_embeddings_path, self.save_raw = class_embeddings_path, save_raw
        info = self.backbone.feature_info
        self.adapter = TextAdapter(self.backbone.unet.config.cross_attention_dim)
        self.head = VPDDepthHead(self.head_in_channels(1), info.reductions(), neck_channels=neck_channels,
                                 deconv_channels=deconv_channels, num_deconv=num_deconv, max_depth=max_depth,
                                 decoder_channels=decoder_channels, num_upsample=num_upsample)
        self.val_metrics = _AutoCropDepthMetrics(min_depth_eval, max_depth_eval, eval_crop)
        self.test_metrics = _AutoCropDepthMetrics(min_depth_eval, max_depth_eval, eval_crop)

    # ------------------------------------------------------------------ prompts
    def setup(self, stage: str) -> None:
        if self.scene_names is None:
            names = self.datamodule_names("scene_names")
            if names is None:
                warnings.warn("DepthTask: no scene_names given and the datamodule has none; every image gets "
                              "the generic scene 'room'", stacklevel=2)
                names = ["room"]
            self.scene_names = names
            self.hparams["scene_names"] = names  # saved with checkpoints

    def scene_prompts(self, scene: Tensor | None, batch: int) -> Tensor:
        """(B,) scene indices (None = 0) -> (B, 1, D) adapted scene embeddings (one token per image)."""
        names = self.scene_names or ["room"]
        table = self.adapter(self.prompt_table(names, self.templates, self.prompt_max_length,
                                               self.class_embeddings_path))  # (S, D)
        if scene is None:
            scene = torch.zeros(batch, dtype=torch.long, device=table.device)
        scene = torch.as_tensor(scene, device=table.device).long().view(-1)
        if len(scene) != batch or (len(scene) and (scene.min() < 0 or scene.max() >= len(names))):
            raise ValueError(f"batch['scene'] must hold {batch} indices in [0, {len(names)}) (scene names "
                             f"{names[:4]}...), got {scene.tolist()}")
        return table[scene][:, None, :]

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, scene: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) in [0, 1] (+ (B,) scene ids) -> depth (B, 1, H, W) in metres.

        The image is padded (grey) to the backbone's size multiple, as VPD pads 480 to 512; the
        head crops the fused map to the image before decoding (VPD ``model.py``).
        """
        h, w = images.shape[-2:]
        feats, _ = self.dense_features(images, self.scene_prompts(scene, len(images)))
        return self.head(feats, (h, w))

    def _flip_tta(self, images: Tensor, scene: Tensor | None) -> Tensor:
        if not self.flip_test:
            return self(images, scene)
        b = len(images)
        both = torch.cat([images, images.flip(-1)])
        pred = self(both, None if scene is None else torch.cat([scene, scene]))
        return (pred[:b] + pred[b:].flip(-1)) / 2

    @torch.no_grad()
    def predict_depth(self, images: Tensor, scene: Tensor | None = None) -> Tensor:
        """Depth with the test-time augmentation of VPD (flip, shift windows): (B, 1, H, W) metres."""
        b, _, h, w = images.shape
        if self.shift_windows < 2 or w <= h:
            return self._flip_tta(images, scene)
        step = (w - h) // (self.shift_windows - 1)
        starts = [i * step for i in range(self.shift_windows)]
        crops = torch.cat([images[..., x : x + h] for x in starts])  # (n*B, 3, h, h), window-major
        scenes = None if scene is None else scene.repeat(len(starts))
        preds = self._flip_tta(crops, scenes).view(len(starts), b, 1, h, h)
        total = images.new_zeros(b, 1, h, w)
        count = images.new_zeros(1, 1, h, w)
        for x, p in zip(starts, preds, strict=True):
            total[..., x : x + h] += p
            count[..., x : x + h] += 1
        return total / count.clamp_min(1)  # VPD's step never leaves a column uncovered; clamp for odd widths

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        pred = self(batch["image"], batch.get("scene"))
        loss = silog_loss(pred, batch["depth"], batch["depth"] > 0, lam=self.silog_lambda)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(pred))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        pred = self.predict_depth(batch["image"], batch.get("scene"))
        target = batch["depth"]
        valid = target > 0
        if valid.any():
            loss = silog_loss(pred.clamp_min(1e-6), target, valid, lam=self.silog_lambda)
            self.log(f"{stage}/loss", loss, batch_size=len(pred))
        getattr(self, f"{stage}_metrics").update(pred, target)

    def _log_metrics(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_metrics")
        if int(metric.count) > 0:
            self.log_dict({f"{stage}/{k}": v for k, v in metric.compute().items()})
        metric.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Writes ``<name>.png`` (coloured depth with a colour bar; ``<name>_mm.png`` 16-bit mm) per image.

        Returns:
            {"depth": (B, 1, H, W) metres}.
        """
        depth = self.predict_depth(batch["image"], batch.get("scene"))
        for name, d in zip(self.batch_names(batch, batch_idx), depth, strict=True):
            stem = self.prediction_stem(name)
            viz.save_png(viz.depth_to_image(d, max_depth=self.max_depth), stem.with_name(stem.name + ".png"))
            if self.save_raw:
                mm = np.clip(d[0].float().cpu().numpy() * 1000.0 + 0.5, 0, 65535).astype(np.uint16)
                viz.save_png(Image.fromarray(mm), stem.with_name(stem.name + "_mm.png"))
        return {"depth": depth}
