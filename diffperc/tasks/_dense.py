"""What the VPD dense tasks (depth, semantic and referring segmentation) share.

- the VPD backbone a task builds when given no ``backbone_kwargs`` (:data:`VPD_BACKBONE`: the
  four decoder taps, t = 1 without noise, the VAE posterior mode **unscaled** as VPD feeds
  ``encoder_vq.encode(x).mode()``, the UNet fine-tuned);
- the UNet forward with prompt embeddings and VPD's attention-map concatenation, on an image
  padded to the backbone's size multiple (VPD zero-pads its 480 crops to 512 in [-1, 1], i.e.
  grey 0.5 in [0, 1]);
- VPD's name-based optimiser groups of each recipe, in diffusers names (:func:`vpd_param_group`);
- class/scene embedding tables, computed from names or loaded from VPD's released ``.pth`` files;
- the per-iteration learning-rate schedules of the recipes (``_schedules.py``);
- an output folder for ``predict`` PNGs with unique, atomic file names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from ..heads.vpd import concat_attention, vpd_in_channels
from ._base import PerceptionTask
from ._schedules import lr_scheduler_config
from ._text import IMAGENET_TEMPLATES, class_embeddings, load_embedding_table

__all__ = ["GROUP_RULES", "VPD_BACKBONE", "VPD_BACKBONE_ATTENTION", "DenseTask", "pad_images", "vpd_param_group"]

# VPD's backbone (vpd/models.py UNetWrapper + each task's model): LDM output_blocks 1, 4, 7, 11, t = 1,
# no noise, encoder_vq.encode(x).mode() without the 0.18215 scaling, UNet fine-tuned.
VPD_BACKBONE: dict[str, Any] = {"layers": "vpd", "timestep": 1, "add_noise": False, "scale_latents": False,
                                "trainable": True}
# + the cross-attention maps of down and up blocks at 1/16 and 1/32 (UNetWrapper's attn32 / attn16;
# the 1/8 maps exceed max_attn_size and the mid block is not selected by 'up_cross+down_cross').
VPD_BACKBONE_ATTENTION: dict[str, Any] = {**VPD_BACKBONE, "attention": True, "attention_resolutions": [16, 32]}

GROUP_RULES = ("vpd_depth", "vpd_semseg", "vpd_refseg", "plain")
# LDM UNet parameters with 'norm' in their name are the SpatialTransformer norm and the
# BasicTransformerBlock norm1-3 (ResBlock norms are in_layers.0 / out_layers.0); in diffusers:
_TRANSFORMER_NORM = re.compile(r"\.attentions\.\d+\.(norm|transformer_blocks\.\d+\.norm\d)\.(weight|bias)$")


def vpd_param_group(rule: str, name: str, param: Tensor) -> tuple[str, bool, bool]:
    """VPD's optimiser group of one trainable parameter of a dense task.

    Args:
        rule: ``"vpd_depth"`` (``depth/models_depth/optimizer.py``: 1-d and ``.bias`` parameters
            without weight decay; UNet at the low lr), ``"vpd_semseg"`` (mmcv ``custom_keys`` of
            ``fpn_vpd_sd1-5_512x512_gpu8x2.py``: the key ``'norm'`` sorts before ``'unet'``, so the
            UNet's transformer norms train at the **full** lr without decay, the rest of the UNet at
            the low lr with decay, the head and adapter at the full lr with decay, biases and norms
            included), ``"vpd_refseg"`` (``refer/train.py``: UNet transformer norms without decay,
            everything else with decay) or ``"plain"`` (everything decays, UNet at the low lr).
        name: the parameter's name in the task (``backbone.unet.*``, ``adapter.*``, ``head.*``).
        param: the parameter.

    Returns:
        (group name, trains at ``backbone_lr_mult``?, weight decay?).
    """
    if rule not in GROUP_RULES:
        raise ValueError(f"optimizer_groups must be one of {GROUP_RULES}, got {rule!r}")
    unet = name.startswith("backbone.")
    base = "backbone" if unet else "head"
    if rule == "vpd_depth":
        decay = not (param.ndim == 1 or name.endswith(".bias"))
        return base + ("" if decay else "_no_decay"), unet, decay
    if unet and rule in ("vpd_semseg", "vpd_refseg") and _TRANSFORMER_NORM.search(name):
        return "backbone_norm", rule == "vpd_refseg", False
    return base, unet, True


def pad_images(images: Tensor, multiple: int, value: float = 0.5) -> Tensor:
    """(B, 3, H, W) -> (B, 3, H', W') padded at the bottom/right to multiples of ``multiple`` with ``value``."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, (-w) % multiple, 0, (-h) % multiple), value=value)


class DenseTask(PerceptionTask):
    """Base of :class:`~diffperc.tasks.depth.DepthTask`, ``SemSegTask`` and ``RefSegTask``.

    Args:
        backbone, backbone_kwargs, optimizer, backbone_lr_mult: see :class:`PerceptionTask`.
            ``backbone_kwargs=None`` builds :data:`VPD_BACKBONE` (``DEFAULT_BACKBONE_KWARGS``).
        lr_schedule: ``"poly"``, ``"vpd_depth"`` or ``"constant"``, stepped every iteration
            over the trainer's ``estimated_stepping_batches`` (see ``_schedules.py``).
        warmup_steps, warmup_ratio: linear warm-up of ``"poly"`` (mmcv style).
        poly_power: exponent of ``"poly"``.
        min_lr_ratio: floor of the schedule, as a fraction of the base lr.
        ramp_fraction: share of training over which ``"vpd_depth"`` ramps up.
        optimizer_groups: the recipe's parameter groups (:func:`vpd_param_group`).
        output_dir: folder of the ``predict`` PNGs; None = ``<trainer.default_root_dir>/predictions``.
    """

    DEFAULT_BACKBONE_KWARGS: dict[str, Any] = VPD_BACKBONE

    def __init__(
        self, backbone: str, backbone_kwargs: dict[str, Any] | None, optimizer: OptimizerCallable,
        backbone_lr_mult: float, lr_schedule: str = "constant", warmup_steps: int = 0, warmup_ratio: float = 1e-6,
        poly_power: float = 1.0, min_lr_ratio: float = 0.0, ramp_fraction: float = 0.48,
        output_dir: str | None = None, optimizer_groups: str = "vpd_depth",
    ) -> None:
        if optimizer_groups not in GROUP_RULES:
            raise ValueError(f"optimizer_groups must be one of {GROUP_RULES}, got {optimizer_groups!r}")
        kwargs = dict(self.DEFAULT_BACKBONE_KWARGS) if backbone_kwargs is None else backbone_kwargs
        super().__init__(backbone, kwargs, optimizer, backbone_lr_mult)
        self._schedule = {"name": lr_schedule, "warmup_steps": warmup_steps, "warmup_ratio": warmup_ratio,
                          "power": poly_power, "min_ratio": min_lr_ratio, "ramp_fraction": ramp_fraction}
        from ._schedules import lr_factor

        lr_factor(**{**self._schedule, "total_steps": 1})  # validates the options now, not at fit time
        self.output_dir, self.optimizer_groups = output_dir, optimizer_groups
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

    def prompt_table(self, names: Sequence[str], templates: Sequence[str] | None, max_length: int,
                     path: str | None = None) -> Tensor:
        """(K, D) embeddings of class/scene ``names`` (:func:`~diffperc.tasks._text.class_embeddings`).

        Computed once with the frozen text encoder on first use (on the device the task runs on),
        or loaded from ``path`` (VPD's released ``class_embeddings.pth`` / ``nyu_class_embeddings.pth``:
        a (K, D) tensor in the order of ``names``); kept as a non-persistent buffer: checkpoints
        store the names (and the path), not the embeddings.
        """
        key = (tuple(names), tuple(templates or IMAGENET_TEMPLATES), int(max_length), path)
        if getattr(self, "_table_key", None) != key:
            bb = self.backbone
            if path is not None:
                table = load_embedding_table(path, len(names), bb.unet.config.cross_attention_dim)
                table = table.to(next(bb.text_encoder.parameters()).device)
            else:
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
        """The recipe's groups (``optimizer_groups``): ``name``, ``params``, ``lr_scale`` and, without decay,
        ``weight_decay=0``."""
        groups: dict[str, dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            group, low_lr, decay = vpd_param_group(self.optimizer_groups, name, p)
            if group not in groups:
                groups[group] = {"params": [], "name": group, "lr_scale": self.backbone_lr_mult if low_lr else 1.0,
                                 **({} if decay else {"weight_decay": 0.0})}
            groups[group]["params"].append(p)
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters")
        return list(groups.values())

    def configure_optimizers(self) -> dict[str, Any]:
        """``optimizer(groups)``, each group's lr times its ``lr_scale``, and the recipe's per-iteration schedule."""
        opt = self.optimizer(self.parameter_groups())
        for group in opt.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
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
