"""Semantic segmentation, VPD recipe (Zhao et al., ICCV 2023, arXiv 2303.02153; repo wl-zhao/VPD ``segmentation/``).

The UNet (t = 1, no noise, unscaled posterior-mode latents, fine-tuned at 0.1x lr) is
conditioned on the K class-name embeddings refined by VPD's text adapter; the averaged
cross-attention maps of the K tokens at 1/16 and 1/32 are concatenated to the UNet features
there, and a Semantic FPN head predicts the classes (cross-entropy, ignore 255, averaged over all
pixels as mmseg 0.30). Evaluation: mIoU and pixel accuracy (mmseg), with mmseg's sliding-window
inference (crop 512, stride 341, logits averaged), logits resized to the label map (ADE20K: the
annotation's original size) before the argmax. ANCHORS.md section 1.

    diffperc fit  --config configs/semseg/ade20k_vpd_sd15.yaml
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from .. import viz
from ..heads.segmentation import SemanticFPNHead
from ..heads.vpd import TextAdapter
from ..metrics import SegMetrics
from ._dense import VPD_BACKBONE_ATTENTION, DenseTask

__all__ = ["SemSegTask", "slide_windows"]


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide`` grid: (y1, y2, x1, x2) windows of at most crop x crop covering an h x w image.

    The last window of each row/column is shifted back to end at the border (mmseg semantics).
    """
    if crop < 1 or stride < 1:
        raise ValueError(f"slide crop and stride must be >= 1, got {crop}, {stride}")
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


class SemSegTask(DenseTask):
    """VPD semantic segmentation: class-prompted UNet features + attention maps -> Semantic FPN.

    Batches (``ADE20KDataModule``, ``SegFolderDataModule``): ``{"image": (B, 3, H, W) in [0, 1],
    "mask": (B, H, W) int64 class ids (255 = ignore), "name": list of B str}``.

    Args:
        backbone, backbone_kwargs, optimizer, backbone_lr_mult: see :class:`PerceptionTask`
            (VPD: ``sd15``; ``backbone_kwargs=None`` =
            :data:`~diffperc.tasks._dense.VPD_BACKBONE_ATTENTION`; AdamW, UNet at 0.1x).
        num_classes: K (ADE20K: 150); also the number of prompt tokens.
        class_names: K names to embed; None = the datamodule's ``class_names``.
        templates, prompt_max_length: see :func:`~diffperc.tasks._text.class_embeddings`
            (None = the 80 ImageNet templates; 20 tokens).
        class_embeddings_path: a (K, D) table to use instead of computing one from the names, e.g.
            VPD's released ``segmentation/class_embeddings.pth`` (ADE20K label order).
        ignore_index: label without loss or score (255).
        loss_avg_non_ignore: average the cross-entropy over labelled pixels only (torch's
            default). False (mmseg 0.30's ``avg_non_ignore=False``, VPD): over all pixels, ignored
            ones counting 0.
        fpn_channels, head_channels, dropout: Semantic FPN sizes (VPD: 256, 256, 0.1; None = fpn_channels).
        slide_crop, slide_stride: sliding-window inference at val/test/predict when the image is
            larger than the crop (mmseg ADE20K: 512, 341); ``slide_crop: null`` = whole image.
        lr_schedule ... output_dir: see :class:`~diffperc.tasks._dense.DenseTask` (VPD: poly,
            power 1, 1,500 warm-up iterations).
        optimizer_groups: ``"vpd_semseg"`` (VPD's mmcv ``custom_keys``; see ``vpd_param_group``).
    """

    DEFAULT_BACKBONE_KWARGS = VPD_BACKBONE_ATTENTION

    def __init__(
        self, backbone: str = "sd15", backbone_kwargs: dict[str, Any] | None = None, num_classes: int = 150,
        class_names: list[str] | None = None, templates: list[str] | None = None, prompt_max_length: int = 20,
        class_embeddings_path: str | None = None, ignore_index: int = 255, loss_avg_non_ignore: bool = False,
        fpn_channels: int = 256, head_channels: int | None = None, dropout: float = 0.1,
        slide_crop: int | None = 512, slide_stride: int = 341, optimizer: OptimizerCallable = torch.optim.AdamW,
        backbone_lr_mult: float = 0.1, lr_schedule: str = "poly", warmup_steps: int = 1500,
        warmup_ratio: float = 1e-6, poly_power: float = 1.0, min_lr_ratio: float = 0.0, ramp_fraction: float = 0.48,
        output_dir: str | None = None, optimizer_groups: str = "vpd_semseg",
    ) -> None:
        super().__init__(backbone, backbone_kwargs, optimizer, backbone_lr_mult, lr_schedule, warmup_steps,
                         warmup_ratio, poly_power, min_lr_ratio, ramp_fraction, output_dir, optimizer_groups)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        if slide_crop is not None and (slide_crop < 1 or not 1 <= slide_stride <= slide_crop):
            raise ValueError(f"need slide_crop >= 1 and 1 <= slide_stride <= slide_crop, got {slide_crop}, "
                             f"{slide_stride}")
        self.num_classes, self.ignore_index, self.loss_avg_non_ignore = num_classes, ignore_index, loss_avg_non_ignore
        self.class_embeddings_path = class_embeddings_path
        self.class_names = list(class_names) if class_names is not None else None
        self.templates, self.prompt_max_length = templates, prompt_max_length
        self.slide_crop, self.slide_stride = slide_crop, slide_stride
        self.adapter = TextAdapter(self.backbone.unet.config.cross_attention_dim)
        self.head = SemanticFPNHead(self.head_in_channels(num_classes), self.backbone.feature_info.reductions(),
                                    num_classes, channels=fpn_channels, dropout=dropout, head_channels=head_channels)
        self.val_metrics = SegMetrics(num_classes, ignore_index)
        self.test_metrics = SegMetrics(num_classes, ignore_index)

    def setup(self, stage: str) -> None:
        if self.class_names is None:
            names = self.datamodule_names("class_names")
            if names is None:
                raise ValueError("SemSegTask needs class names for its prompts: set model.init_args.class_names "
                                 "or use a datamodule with a class_names attribute (ADE20KDataModule has one)")
            if len(names) != self.num_classes:
                raise ValueError(f"the datamodule has {len(names)} class_names but num_classes is "
                                 f"{self.num_classes}; set model.init_args.num_classes={len(names)}")
            self.class_names = names
            self.hparams["class_names"] = names

    def class_prompts(self, batch: int) -> Tensor:
        """(B, K, D) adapted class-name embeddings (the same K tokens for every image)."""
        if self.class_names is None:
            raise RuntimeError("SemSegTask has no class names yet: pass class_names or run it through a Trainer "
                               "with a datamodule that has class_names")
        table = self.prompt_table(self.class_names, self.templates, self.prompt_max_length,
                                  self.class_embeddings_path)  # (K, D)
        return self.adapter(table)[None].expand(batch, -1, -1)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> class logits (B, K, H, W) (one pass, image padded then cropped)."""
        h, w = images.shape[-2:]
        feats, size = self.dense_features(images, self.class_prompts(len(images)))
        return self.head(feats, size)[..., :h, :w]

    @torch.no_grad()
    def predict_logits(self, images: Tensor) -> Tensor:
        """Logits (B, K, H, W), with mmseg's sliding window when the image is larger than ``slide_crop``."""
        h, w = images.shape[-2:]
        if self.slide_crop is None or (h <= self.slide_crop and w <= self.slide_crop):
            return self(images)
        logits = images.new_zeros(len(images), self.num_classes, h, w)
        count = images.new_zeros(1, 1, h, w)
        for y1, y2, x1, x2 in slide_windows(h, w, self.slide_crop, self.slide_stride):
            logits[..., y1:y2, x1:x2] += self(images[..., y1:y2, x1:x2])
            count[..., y1:y2, x1:x2] += 1
        return logits / count

    # ------------------------------------------------------------------ steps
    def loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        """Cross-entropy of (B, K, H, W) logits against (B, H, W) labels (mmseg 0.30 reduction unless
        ``loss_avg_non_ignore``)."""
        if self.loss_avg_non_ignore:
            return F.cross_entropy(logits, mask, ignore_index=self.ignore_index)
        per_pixel = F.cross_entropy(logits, mask, ignore_index=self.ignore_index, reduction="none")
        return per_pixel.mean()  # ignored pixels count 0 in the mean (mmseg weight_reduce_loss, no avg_factor)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        logits = self.predict_logits(batch["image"])
        mask = batch["mask"]
        if logits.shape[-2:] != mask.shape[-2:]:  # mmseg: logits resized to the original size, then argmax
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        if (mask != self.ignore_index).any():
            self.log(f"{stage}/loss", self.loss(logits, mask), batch_size=len(logits))
        getattr(self, f"{stage}_metrics").update(logits.argmax(1), mask)

    def _log_metrics(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_metrics")
        scores = metric.compute()
        self.log_dict({f"{stage}/{k}": scores[k] for k in ("miou", "pixel_acc", "mean_acc")})
        metric.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Writes ``<name>.png``: the predicted classes' colours over the image.

        Returns:
            {"mask": (B, H, W) int64 class ids} (not the logits: K x H x W floats per image add up).
        """
        logits = self.predict_logits(batch["image"])
        mask = logits.argmax(1)
        for name, img, m in zip(self.batch_names(batch, batch_idx), batch["image"], mask, strict=True):
            stem = self.prediction_stem(name)
            viz.save_png(viz.mask_overlay(img, m, alpha=0.5), stem.with_name(stem.name + ".png"))
        return {"mask": mask}
