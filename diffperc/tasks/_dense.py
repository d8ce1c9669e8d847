"""What the VPD dense tasks (depth, semantic and referring segmentation) share.

- the UNet forward with prompt embeddings and VPD's attention-map concatenation, on an image
  padded to the backbone's size multiple (VPD zero-pads its 480 crops to 512 in [-1, 1], i.e.
  grey 0.5 in [0, 1]) and outputs cropped back;
- the per-iteration learning-rate schedules of the recipes (``_schedules.py``);
- an output folder for ``predict`` PNGs with unique, atomic file names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from ..heads.vpd import concat_attention, vpd_in_channels
from ._base import PerceptionTask
from ._schedules import lr_scheduler_config
from ._text import IMAGENET_TEMPLATES, class_embeddings

__all__ = ["DenseTask", "pad_images"]


def pad_images(images: Tensor, multiple: int, value: float = 0.5) -> Tensor:
    """(B, 3, H, W) -> (B, 3, H', W') padded at the bottom/right to multiples of ``multiple`` with ``value``."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, (-w) % multiple, 0, (-h) % multiple), value=value)


class DenseTask(PerceptionTask):
    """Base of :class:`~diffperc.tasks.depth.DepthTask`, ``SemSegTask`` and ``RefSegTask``.

    Args:
        backbone, backbone_kwargs, optimizer, backbone_lr_mult: see :class:`PerceptionTask`.
        lr_schedule: ``"poly"``, ``"vpd_depth"`` or ``"constant"``, stepped every iteration
            over the trainer's ``estimated_stepping_batches`` (see ``_schedules.py``).
        warmup_steps, warmup_ratio: linear warm-up of ``"poly"`` (mmcv style).
        poly_power: exponent of ``"poly"``.
        min_lr_ratio: floor of the schedule, as a fraction of the base lr.
        ramp_fraction: share of training over which ``"vpd_depth"`` ramps up.
        decay_1d: apply weight decay to 1-d parameters (biases, norm scales, the adapter's
            gamma) too. False as VPD (depth: every 1-d parameter and bias; referring: norm layers).
        output_dir: folder of the ``predict`` PNGs; None = ``<trainer.default_root_dir>/predictions``.
    """

    def __init__(
        self, backbone: str, backbone_kwargs: dict[str, Any] | None, optimizer: OptimizerCallable,
        backbone_lr_mult: float, lr_schedule: str = "constant", warmup_steps: int = 0, warmup_ratio: float = 1e-6,
        poly_power: float = 1.0, min_lr_ratio: float = 0.0, ramp_fraction: float = 0.48,
        output_dir: str | None = None, decay_1d: bool = False,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, optimizer, backbone_lr_mult)
        self._schedule = {"name": lr_schedule, "warmup_steps": warmup_steps, "warmup_ratio": warmup_ratio,
                          "power": poly_power, "min_ratio": min_lr_ratio, "ramp_fraction": ramp_fraction}
        from ._schedules import lr_factor

        lr_factor(**{**self._schedule, "total_steps": 1})  # validates the options now, not at fit time
        self.output_dir, self.decay_1d = output_dir, decay_1d
        self._written: set[str] = set()

    # ------------------------------------------------------------------ backbone + attention
    def attention_reductions(self) -> list[int]:
        """Reductions whose cross-attention maps are concatenated to the features ([] without attention)."""
        bb = self.backbone
        if not getattr(bb, "attention", False):
            return []
        if bb.attention_resolutions is None:
            raise ValueError(f"{type(self).__name__}: backbone_kwargs has attention=True but no "
                             "attention_resolutions; name the reductions whose maps are concatenated "
                             "(VPD: [16, 32])")
        return [int(r) for r in bb.attention_resolutions]

    def head_in_channels(self, num_tokens: int) -> list[int]:
        """Channels of each backbone feature after the attention maps of ``num_tokens`` tokens are appended."""
        return vpd_in_channels(self.backbone.feature_info, num_tokens, self.attention_reductions())

    def dense_features(self, images: Tensor, prompt_embeds: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
        """Backbone features (+ attention maps) of images padded to the backbone's size multiple.

        Args:
            images: (B, 3, H, W) in [0, 1].
            prompt_embeds: (B, L, D) adapted prompt embeddings.

        Returns:
            (features, padded size): one (B, C_i (+ L), H'/r_i, W'/r_i) map per backbone level.
        """
        padded = pad_images(images, self.backbone.size_multiple)
        out = self.backbone(padded, prompt_embeds=prompt_embeds)
        feats = concat_attention(out.features, out.attention, self.backbone.feature_info.reductions())
        return feats, tuple(padded.shape[-2:])

    def prompt_table(self, names: Sequence[str], templates: Sequence[str] | None, max_length: int) -> Tensor:
        """(K, D) embeddings of class/scene ``names`` (:func:`~diffperc.tasks._text.class_embeddings`).

        Computed once with the frozen text encoder on first use (on the device the task runs on),
        kept as a non-persistent buffer: checkpoints store the names, not the embeddings.
        """
        key = (tuple(names), tuple(templates or IMAGENET_TEMPLATES), int(max_length))
        if getattr(self, "_table_key", None) != key:
            bb = self.backbone
            table = class_embeddings(bb.text_encoder, bb.tokenizer, key[0], key[1], key[2])
            self.register_buffer("_prompt_table", table, persistent=False)
            self._table_key = key
        return self._prompt_table

    def datamodule_names(self, attr: str) -> list[str] | None:
        """``trainer.datamodule.<attr>`` (e.g. ``scene_names``, ``class_names``) if there is one."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, attr, None)
        return list(names) if names is not None else None

    # ------------------------------------------------------------------ optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """``head`` and ``backbone`` groups; unless ``decay_1d``, their 1-d parameters in ``*_no_decay`` groups."""
        groups = super().parameter_groups()
        if self.decay_1d:
            return groups
        out = []
        for g in groups:
            for suffix, ps in (("", [p for p in g["params"] if p.ndim > 1]),
                               ("_no_decay", [p for p in g["params"] if p.ndim <= 1])):
                if ps:
                    out.append({**g, "params": ps, "name": g["name"] + suffix,
                                **({"weight_decay": 0.0} if suffix else {})})
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        """``optimizer(groups)``, backbone groups at ``backbone_lr_mult``, and the recipe's per-iteration schedule."""
        opt = self.optimizer(self.parameter_groups())
        for group in opt.param_groups:
            if str(group.get("name", "")).startswith("backbone"):
                group["lr"] *= self.backbone_lr_mult
        total = float(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1.0
        sched = lr_scheduler_config(opt, total_steps=total, **self._schedule)
        return {"optimizer": opt, "lr_scheduler": sched}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        """Update ``<stage>_metrics`` (and log ``<stage>/loss``) for one batch; ``stage`` is "val" or "test"."""
        raise NotImplementedError

    def _log_metrics(self, stage: str) -> None:
        """Log ``<stage>/<metric>`` from ``<stage>_metrics`` at the end of an epoch, then reset it."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ------------------------------------------------------------------ predictions on disk
    def prediction_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        root = self.trainer.default_root_dir if self._trainer is not None else "."
        return Path(root) / "predictions"

    def on_predict_epoch_start(self) -> None:
        self._written = set()

    def prediction_stem(self, name: str) -> Path:
        """``<prediction_dir>/<name>`` without extension, unique within this predict run (callers add ``.png``)."""
        stem = Path(str(name)).with_suffix("").as_posix().strip("/").replace("/", "_") or "sample"
        candidate, k = stem, 1
        while candidate in self._written:
            candidate, k = f"{stem}_{k}", k + 1
        self._written.add(candidate)
        return self.prediction_dir() / candidate

    @staticmethod
    def batch_names(batch: dict[str, Any], batch_idx: int) -> Sequence[str]:
        names = batch.get("name")
        if names is None:
            return [f"{batch_idx:05d}_{i}" for i in range(len(batch["image"]))]
        return [names] if isinstance(names, str) else list(names)
