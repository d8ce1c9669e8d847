"""Referring image segmentation, VPD recipe (Zhao et al., ICCV 2023, arXiv 2303.02153; repo wl-zhao/VPD ``refer/``).

The sentence's token embeddings (frozen text encoder ``last_hidden_state``, 40 tokens for
RefCOCO/RefCOCO+, 77 for G-Ref) go through VPD's text adapter into the UNet (t = 1, no noise,
unscaled posterior-mode latents, fine-tuned); the cross-attention maps of the tokens at 1/16 and 1/32 are concatenated to the
features there, and a LAVT-style top-down decoder gives background/object logits
(cross-entropy with class weights 0.9 / 1.1, as ``refer/train.py``). Metrics: overall IoU, mean
IoU, precision@0.5..0.9 (LAVT). ANCHORS.md section 1.

    diffperc fit --config configs/refseg/refcoco_vpd_sd15.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from .. import viz
from ..heads.referring import RefSegDecoder
from ..heads.vpd import TextAdapter
from ..metrics import RefSegMetrics
from ._dense import VPD_BACKBONE_ATTENTION, DenseTask
from ._text import encode_sentences

__all__ = ["RefSegTask"]

_PALETTE = ((0, 0, 0), (255, 40, 40))  # background (not drawn), referred object


class RefSegTask(DenseTask):
    """VPD referring segmentation: sentence-prompted UNet features + attention maps -> 2-class decoder.

    Batches (``RefCOCODataModule``): ``{"image": (B, 3, H, W) in [0, 1], "mask": (B, H, W) int64
    in {0, 1}, "sentence": list of B str, "name": list of B str}``.

    Args:
        backbone, backbone_kwargs, optimizer, backbone_lr_mult: see :class:`PerceptionTask`
            (VPD: ``sd15``; ``backbone_kwargs=None`` =
            :data:`~diffperc.tasks._dense.VPD_BACKBONE_ATTENTION`; AdamW).
        max_tokens: tokens per sentence, padded/truncated (VPD: 40 RefCOCO/+, 77 G-Ref); also
            the number of attention channels.
        hidden: decoder width; None = half the deepest map's channels (VPD: 640).
        class_weights: cross-entropy weights of background and object (VPD: 0.9, 1.1); None = equal.
        lr_schedule ... output_dir: see :class:`~diffperc.tasks._dense.DenseTask` (VPD: poly 0.9 per
            iteration, no warm-up).
        optimizer_groups: ``"vpd_refseg"`` (``refer/train.py``: only the UNet's transformer norms
            without weight decay; see ``vpd_param_group``).
    """

    DEFAULT_BACKBONE_KWARGS = VPD_BACKBONE_ATTENTION

    def __init__(
        self, backbone: str = "sd15", backbone_kwargs: dict[str, Any] | None = None, max_tokens: int = 40,
        hidden: int | None = None, class_weights: tuple[float, float] | None = (0.9, 1.1),
        optimizer: OptimizerCallable = torch.optim.AdamW, backbone_lr_mult: float = 1.0, lr_schedule: str = "poly",
        warmup_steps: int = 0, warmup_ratio: float = 1e-6, poly_power: float = 0.9, min_lr_ratio: float = 0.0,
        ramp_fraction: float = 0.48, output_dir: str | None = None, optimizer_groups: str = "vpd_refseg",
    ) -> None:
        super().__init__(backbone, backbone_kwargs, optimizer, backbone_lr_mult, lr_schedule, warmup_steps,
                         warmup_ratio, poly_power, min_lr_ratio, ramp_fraction, output_dir, optimizer_groups)
        limit = self.backbone.text_encoder.config.max_position_embeddings
        if not 2 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be in [2, {limit}] (the text encoder's positions), got {max_tokens}")
        if class_weights is not None and (len(class_weights) != 2 or min(class_weights) <= 0):
            raise ValueError(f"class_weights must be two positive numbers (background, object), got {class_weights}")
        self.max_tokens = max_tokens
        weights = torch.tensor(class_weights if class_weights is not None else (1.0, 1.0), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.adapter = TextAdapter(self.backbone.unet.config.cross_attention_dim)
        self.head = RefSegDecoder(self.head_in_channels(max_tokens), self.backbone.feature_info.reductions(),
                                  hidden=hidden, num_classes=2)
        self.val_metrics = RefSegMetrics()
        self.test_metrics = RefSegMetrics()

    def sentence_prompts(self, sentences: Sequence[str]) -> Tensor:
        """B sentences -> (B, max_tokens, D) adapted token embeddings (text encoder frozen)."""
        bb = self.backbone
        return self.adapter(encode_sentences(bb.text_encoder, bb.tokenizer, list(sentences), self.max_tokens))

    def forward(self, images: Tensor, sentences: Sequence[str]) -> Tensor:
        """(B, 3, H, W) in [0, 1] + B sentences -> logits (B, 2, H, W) (1 = the referred object)."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if len(sentences) != len(images):
            raise ValueError(f"got {len(sentences)} sentences for {len(images)} images; give one per image")
        h, w = images.shape[-2:]
        feats, size = self.dense_features(images, self.sentence_prompts(sentences))
        return self.head(feats, size)[..., :h, :w]

    # ------------------------------------------------------------------ steps
    def _loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        return F.cross_entropy(logits, mask.long(), weight=self.class_weights.to(logits.dtype))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["image"], batch["sentence"])
        loss = self._loss(logits, batch["mask"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch["image"], batch["sentence"])
        self.log(f"{stage}/loss", self._loss(logits, batch["mask"]), batch_size=len(logits))
        getattr(self, f"{stage}_metrics").update(logits.argmax(1), batch["mask"])

    def _log_metrics(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_metrics")
        if int(metric.total) > 0:
            self.log_dict({f"{stage}/{k}": v for k, v in metric.compute().items()})
        metric.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Writes ``<name>.png``: the predicted object in red over the image, the sentence below.

        Returns:
            {"mask": (B, H, W) int64 in {0, 1}, "prob": (B, H, W) object probability}.
        """
        logits = self(batch["image"], batch["sentence"])
        mask = logits.argmax(1)
        for name, img, m, text in zip(self.batch_names(batch, batch_idx), batch["image"], mask, batch["sentence"],
                                      strict=True):
            overlay = viz.mask_overlay(img, m, palette=_PALETTE, alpha=0.5, background=0)
            stem = self.prediction_stem(name)
            viz.save_png(viz.image_grid([overlay], nrow=1, labels=[text]), stem.with_name(stem.name + ".png"))
        return {"mask": mask, "prob": logits.softmax(1)[:, 1]}
