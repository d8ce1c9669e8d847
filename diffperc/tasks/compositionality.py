"""Compositional image-text discrimination with a diffusion classifier, as a Lightning test loop.

Jeong et al., "Diffusion Classifiers Understand Compositionality, but Conditions Apply", NeurIPS 2025
D&B, arXiv 2505.17955 (eugene6923/Diffusion-Classifiers-Compositionality). The scoring is
:mod:`diffperc.zeroshot.compositional` (SD UNets) and :mod:`diffperc.zeroshot.flow` (SD3); the
benchmarks are :mod:`diffperc.data.compositional`:

    diffperc test --config configs/compositionality/winoground_diffclf_sd3m.yaml --data.root /data/winoground

At the end it writes ``<output_dir>/<task>_errors.pt`` (the per-timestep error bank, to refit
timestep weights without a model call) and ``<output_dir>/<task>_table.{csv,md}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from ..zeroshot.compositional import ErrorBank, score_items, task_metrics, write_table

__all__ = ["CompositionalityTask", "load_scoring_model"]

FLOW_PRESETS = {"sd3m": "stabilityai/stable-diffusion-3-medium-diffusers"}


def load_scoring_model(name: str, **kwargs: Any) -> torch.nn.Module:
    """An SD backbone (``load_backbone``) or, for ``test_sd3`` / ``sd3m`` / an SD3 folder, a FlowMatchingModel."""
    from ..zeroshot.flow import FlowMatchingModel, tiny_flow_model

    if name == "test_sd3":
        return tiny_flow_model(**kwargs)
    index = Path(name).expanduser() / "model_index.json"
    if name in FLOW_PRESETS or (index.is_file() and "StableDiffusion3" in index.read_text()):
        return FlowMatchingModel.from_pretrained(FLOW_PRESETS.get(name, name), **kwargs)
    from ..backbones.registry import load_backbone

    return load_backbone(name, **kwargs)


class CompositionalityTask(LightningModule):
    """Scores every item of a :class:`~diffperc.data.compositional.CompositionalDataModule` and reports metrics.

    Logs ``test/<subtask>/<metric>`` (accuracy, or Winoground's text/image/group) and ``test/all/...``.

    Args:
        backbone: an SD preset or folder (``sd15``, ``stable-diffusion-v1-5/...``, ``digits``, ``test_sd``) or an
            SD3 one (``sd3m``, an SD3 diffusers folder, ``test_sd3``).
        backbone_kwargs: options of the model loader (e.g. ``{drop_t5: true}`` for SD3, the released ``--encoder_drop``).
        n_timesteps: timesteps per (caption, image) pair (30 as released).
        timesteps: ``"released"`` (default), ``"even"``; for SD3 also ``"later"``, ``"logit_normal"``, ``"mode"``,
            ``"uniform"`` (:class:`~diffperc.zeroshot.flow.FlowMatchingClassifier`).
        loss: ``"l2_norm"`` (the released default) or ``"l2"`` (MSE).
        weighting: SD3 loss weighting ``"sigma_sqrt"`` / ``"cosmap"``; None is uniform.
        normalize: subtract each image's empty-caption error (``--img_retrieval``) before comparing images.
        timestep_weights: optional path of a (S,) tensor (``torch.save``) of learned weights; metrics are then
            also reported with them (rows ``<task>+weights``).
        unet_batch_size: latents per model call.
        seed: seed of the shared noise bank.
        output_dir: where the error bank and tables go; default the trainer's log dir.
    """

    def __init__(self, backbone: str = "digits", backbone_kwargs: dict[str, Any] | None = None, n_timesteps: int = 30,
                 timesteps: str = "released", loss: str = "l2_norm", weighting: str | None = None,
                 normalize: bool = False, timestep_weights: str | None = None, unet_batch_size: int = 32,
                 seed: int = 0, output_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = load_scoring_model(backbone, **(backbone_kwargs or {}))
        self.scorer = {"n_timesteps": n_timesteps, "timesteps": timesteps, "loss": loss, "weighting": weighting,
                       "seed": seed, "batch_size": unet_batch_size}
        self.normalize, self.output_dir = normalize, output_dir
        self.timestep_weights = None
        if timestep_weights is not None:
            w = torch.load(timestep_weights, map_location="cpu", weights_only=True)
            if not isinstance(w, torch.Tensor) or w.shape != (n_timesteps,):
                raise ValueError(f"{timestep_weights} must hold a ({n_timesteps},) weight tensor, got "
                                 f"{getattr(w, 'shape', type(w))}")
            self.timestep_weights = w.float()
        self.bank = ErrorBank()
        self.results: dict[str, dict[str, dict[str, float]]] = {}
        self.strict_loading = False

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Nothing is trained: checkpoints keep no (frozen) model weights."""
        return {}

    def configure_optimizers(self) -> None:
        return None

    def on_test_epoch_start(self) -> None:
        self.bank = ErrorBank(info={"backbone": self.hparams.backbone, **self.scorer, "normalize": self.normalize})

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        score_items(self.backbone, batch, self.bank, normalize=self.normalize, **self.scorer)

    def _task_name(self) -> str:
        dm = getattr(self.trainer, "datamodule", None)
        name = getattr(dm, "task", "compositionality")
        sub = getattr(dm, "subtask", None)
        return f"{name}_{sub}" if sub else name

    def on_test_epoch_end(self) -> None:
        if not len(self.bank):
            return
        name = self._task_name()
        self.results = {name: task_metrics(self.bank, normalize=self.normalize)}
        if self.timestep_weights is not None:
            self.results[f"{name}+weights"] = task_metrics(self.bank, self.timestep_weights, self.normalize)
        for task, subs in self.results.items():
            for sub, metrics in subs.items():
                for k, v in metrics.items():
                    if k != "n":
                        tag = "test" if task == name else "test_weighted"
                        self.log(f"{tag}/{sub}/{k}", v, batch_size=1)
        out = Path(self.output_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        self.bank.save(out / f"{name}_errors.pt")
        write_table(self.results, out / f"{name}_table")
