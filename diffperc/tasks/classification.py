"""Zero-shot image classification with the Diffusion Classifier (no training).

Li, Prabhudesai, Duggal, Brown, Pathak, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", ICCV 2023, arXiv 2303.16203 (diffusion-classifier/diffusion-classifier). The
math is in :mod:`diffperc.zeroshot.classifier`; this task runs it over a DataModule and
reports top-1 / top-5 accuracy and the UNet evaluations each image cost:

    diffperc test --config configs/classification/digits_diffclf_digits.yaml
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..zeroshot.classifier import (
    PAPER_SCHEDULE,
    ClassifierOutput,
    DiffusionClassifier,
    class_prompts,
    default_template,
)
from ._base import PerceptionTask

__all__ = ["ClassificationTask"]


class ClassificationTask(PerceptionTask):
    """Zero-shot classification of ``{"image": (B, 3, H, W) in [0, 1], "label": (B,)}`` batches.

    Run it with ``diffperc test`` (or ``validate`` / ``predict``); there is nothing to fit.
    Logs ``<stage>/top1``, ``<stage>/top5`` (when K > 5; with an adaptive schedule, top-5
    is exact when a round keeps at least 5 classes), ``<stage>/unet_evals`` (UNet evaluations
    per image) and ``<stage>/naive_evals`` (what all classes on all pairs would cost).

    Args:
        backbone, backbone_kwargs: see :class:`~diffperc.tasks._base.PerceptionTask`.
        classes: class names in label order; default the DataModule's ``classes``.
        templates: prompt template(s) with ``{}`` for the class name; several are ensembled. None
            (default): the backbone's training caption (:func:`~diffperc.zeroshot.classifier.default_template`:
            "a photo of the digit {}" for the bundled digits model, "a photo of a {}." otherwise).
        schedule: adaptive rounds ``[[n_samples, keep], ...]`` (see
            :class:`~diffperc.zeroshot.classifier.DiffusionClassifier`); ``[[S, 1]]`` is naive.
        loss: ``"l2"``, ``"l1"`` or ``"huber"``.
        prompt_ensemble: ``"errors"`` or ``"embeddings"`` (with several templates).
        weighting: timesteps (S,) -> weights (S,); None is uniform.
        timestep_range: ``[lo, hi]``: pairs' timesteps evenly spaced over [lo, hi); None is [0, T).
        eliminate: successive-elimination t threshold on top of the rounds' keep caps; None is off.
        unet_batch_size: latents per UNet call (not ``batch_size``, which is the DataModule's: Lightning
            refuses a hyperparameter that the task and the data both have with different values).
        seed: seed of the shared (t, eps) pairs.
        optimizer, backbone_lr_mult: unused (kept for the shared base and YAML compatibility).
    """

    def __init__(
        self, backbone: str = "digits", backbone_kwargs: dict[str, Any] | None = None,
        classes: list[str] | None = None, templates: str | list[str] | None = None,
        schedule: Sequence[Sequence[int]] = PAPER_SCHEDULE, loss: str = "l2", prompt_ensemble: str = "errors",
        weighting: Callable[[Tensor], Tensor] | None = None, timestep_range: Sequence[int] | None = None,
        eliminate: float | None = None, unet_batch_size: int = 32, seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW, backbone_lr_mult: float = 0.1,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, optimizer, backbone_lr_mult)
        self.classes = None if classes is None else list(classes)
        templates = default_template(self.backbone) if templates is None else templates
        if self.classes is not None:
            class_prompts(self.classes, templates)  # fail at construction on a bad class list or template
        self.templates, self.schedule, self.loss = templates, [tuple(r) for r in schedule], loss
        self.prompt_ensemble, self.weighting, self.unet_batch_size = prompt_ensemble, weighting, unet_batch_size
        self.seed = seed
        self.timestep_range = None if timestep_range is None else tuple(timestep_range)
        self.eliminate = eliminate
        self.classifier: DiffusionClassifier | None = None
        if self.classes is not None:
            self._build()

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        self.classifier = DiffusionClassifier.from_classes(
            self.backbone, self.classes, self.templates, schedule=self.schedule, loss=self.loss,
            prompt_ensemble=self.prompt_ensemble, weighting=self.weighting, timestep_range=self.timestep_range,
            eliminate=self.eliminate, batch_size=self.unet_batch_size, seed=self.seed)
        k = len(self.classes)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric
            for stage in ("val", "test")
            for name, metric in (("top1", MulticlassAccuracy(k, top_k=1, average="micro")),
                                 ("top5", MulticlassAccuracy(k, top_k=5, average="micro") if k > 5 else None),
                                 ("unet_evals", MeanMetric()))
            if metric is not None
        })

    def setup(self, stage: str) -> None:
        """Take the class names from the DataModule when none were given."""
        if self.classifier is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "classes", None)
        if names is None:
            raise ValueError(f"{type(self).__name__} needs class names: set model.init_args.classes or use a "
                             f"DataModule with a `classes` attribute ({type(dm).__name__} has none)")
        self.classes = list(names)
        self._build()

    def configure_optimizers(self) -> Any:
        raise RuntimeError("ClassificationTask is zero-shot (training-free): run `diffperc test` or `validate`, "
                           "not `fit`")

    # ------------------------------------------------------------------ steps
    def forward(self, images: Tensor) -> ClassifierOutput:
        """(B, 3, H, W) in [0, 1] -> :class:`ClassifierOutput` (pred, ranking, scores, unet_evals)."""
        if self.classifier is None:
            raise RuntimeError("no classes yet: pass classes=[...] or run through a Trainer with a DataModule")
        return self.classifier.classify(images)

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        out = self(batch["image"])
        labels, bs = batch["label"], len(batch["label"])
        k = len(self.classes)
        # Pseudo-logits that order classes as the ranking does (rank 0 highest), for top-k accuracy.
        logits = torch.empty(out.ranking.shape).scatter_(1, out.ranking, torch.arange(k, 0, -1.0).expand(bs, -1))
        logits, labels = logits.to(labels.device), labels
        for name in ("top1", "top5"):
            key = f"{stage}_{name}"
            if key in self.metrics:
                self.metrics[key](logits, labels)
                self.log(f"{stage}/{name}", self.metrics[key], prog_bar=True, on_step=False, on_epoch=True,
                         batch_size=bs)
        self.metrics[f"{stage}_unet_evals"](out.unet_evals.float().to(labels.device))
        self.log(f"{stage}/unet_evals", self.metrics[f"{stage}_unet_evals"], prog_bar=True, on_step=False,
                 on_epoch=True, batch_size=bs)
        self.log(f"{stage}/naive_evals", float(out.naive_evals), on_step=False, on_epoch=True, batch_size=bs)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """{"pred": (B,), "ranking": (B, K), "scores": (B, K), "unet_evals": (B,)} for ``diffperc predict``."""
        out = self(batch["image"])
        return {"pred": out.pred, "ranking": out.ranking, "scores": out.scores, "unet_evals": out.unet_evals}
