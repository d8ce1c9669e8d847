"""Shared base of the task LightningModules: backbone building, light checkpoints, optimizer groups.

A task owns loss, metrics, logging and optimizer parameter groups; its head owns the math;
the backbone owns the pretrained weights (DESIGN.md section 4). Checkpoints of a task keep
its head (and a fine-tuned UNet) but not the frozen backbone weights: they keep the
backbone's name and options in the hyperparameters, and loading rebuilds it from those.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from ..backbones.registry import load_backbone

__all__ = ["PerceptionTask"]

_BACKBONE = "backbone."

# A frozen backbone stays in eval mode on purpose (DiffusionBackbone.train keeps it there);
# Lightning would otherwise warn at every fit that hundreds of modules are in eval mode.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class PerceptionTask(LightningModule):
    """Base of every task: builds ``self.backbone`` and the optimizer; subclasses add a head.

    Args:
        backbone: a preset name (``"digits"``, ``"sd15"``, ``"test_sd"``; see
            ``diffperc.list_backbones()``) or a local diffusers folder / hub id.
        backbone_kwargs: options of the backbone (``layers``, ``timestep``, ``add_noise``,
            ``attention``, ``trainable``, ...); None uses the preset's defaults.
        optimizer: called with the parameter groups, e.g. ``torch.optim.AdamW`` or, in YAML,
            ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-3}}``. Its ``lr`` is the head's.
        backbone_lr_mult: learning rate of the trainable backbone parameters relative to the
            head's (VPD fine-tunes the UNet at 0.1x). Unused when the backbone is frozen.
    """

    def __init__(
        self, backbone: str = "digits", backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW, backbone_lr_mult: float = 0.1,
    ) -> None:
        super().__init__()
        # Collects the init arguments of the whole subclass chain. The optimizer (a callable)
        # and any nn.Module or class argument are not stored: checkpoints stay loadable with
        # torch.load(weights_only=True); LightningCLI's config.yaml keeps the full recipe.
        self.save_hyperparameters(ignore=["optimizer"])
        self.remove_ignored_hparams([k for k, v in self.hparams.items() if isinstance(v, nn.Module) or callable(v)])
        self.backbone = load_backbone(backbone, **(backbone_kwargs or {}))
        self.optimizer = optimizer
        self.backbone_lr_mult = backbone_lr_mult
        # Frozen backbone weights are not in checkpoints; the head's keys are checked in on_load_checkpoint.
        self.strict_loading = False

    # ------------------------------------------------------------------ checkpoints
    def _kept_backbone_keys(self) -> set[str]:
        """Backbone parameter names (relative to the backbone) that are trained, so worth saving."""
        return {n for n, p in self.backbone.named_parameters() if p.requires_grad}

    def state_dict(self, *args: Any, destination: dict[str, Any] | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """The module's state without the frozen backbone weights (trainable ones are kept)."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        kept = {prefix + _BACKBONE + n for n in self._kept_backbone_keys()}
        for key in [k for k in state if k.startswith(prefix + _BACKBONE) and k not in kept]:
            del state[key]
        return state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint has every saved key, then fill in the frozen backbone weights.

        Lightning calls this before ``load_state_dict``: the frozen weights come from the
        backbone just rebuilt from the hyperparameters, so loading is complete (no missing-key
        warning) and a checkpoint that lacks a head weight is an error, not a silent skip.
        """
        state = checkpoint.setdefault("state_dict", {})
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} weights of this {type(self).__name__}: "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''}. Was it saved by another "
                           "task, head size or backbone_kwargs (trainable)?")
        full = super().state_dict()
        state.update({k: v for k, v in full.items() if k.startswith(_BACKBONE) and k not in state})

    # ------------------------------------------------------------------ optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters as optimizer groups: ``head`` (everything outside the backbone), ``backbone``."""
        in_backbone = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in in_backbone]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": ps, "name": name} for name, ps in (("head", head), ("backbone", backbone)) if ps]
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters: give it a head, "
                             "or build the backbone with backbone_kwargs={'trainable': True}")
        return groups

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """``optimizer(groups)``; the backbone group then runs at ``backbone_lr_mult`` x the head's lr."""
        opt = self.optimizer(self.parameter_groups())
        for group in opt.param_groups:
            if group.get("name") == "backbone":
                group["lr"] *= self.backbone_lr_mult
        return opt
