"""Training-free open-vocabulary semantic segmentation benchmark: OVDiff on VOC, Context, COCO-Object.

OVDiff: Karazija, Laina, Vedaldi, Rupprecht, ECCV 2024, arXiv 2306.09316; repo karazijal/sdov
(``predict.py``). Recipe and numbers: docs/ovseg.md, ANCHORS.md (Corrections, A3).

    diffperc test --config configs/ovseg/voc_ovdiff_sd15.yaml --data.init_args.root /path/to/VOCdevkit/VOC2012

``test`` (and ``validate``) first prepare the vocabulary of the DataModule (support sets sampled
from the backbone, fg/bg masks, prototypes per extractor; all cached under ``cache_dir`` and
resumable), then label every image and report mIoU over the label ids with ignore 255 as mmseg
computes it (per-class IoU over the whole set, NaN classes left out of the mean). Pictures:
``support/<class>.png`` (each support image with its fg in green and bg in blue) and
``predictions/<name>.png`` (image | ground truth | prediction, with a legend).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import write_text_atomic
from ..metrics import SegMetrics
from ..zeroshot.ovseg.segmenter import OVDiff, prediction_picture
from ..zeroshot.ovseg.support import NEGATIVE_PROMPT, TEMPLATE, slug
from ._base import PerceptionTask

__all__ = ["OVSegTask"]


class OVSegTask(PerceptionTask):
    """OVDiff over a :class:`~diffperc.data.ovseg.OVSegDataModule` (batches are lists of images).

    Args:
        backbone, backbone_kwargs: the diffusion model (see :class:`~diffperc.tasks._base.PerceptionTask`).
        extractors: ``["sd", "dino_vitb8", "clip_vitb16"]`` as released; ``"test_dino"`` /
            ``"test_clip"`` are tiny random ViTs.
        mask_proposer: ``"threshold"``, ``"maskcut"``, ``"maskcut:<vit>"`` or ``"module:function"``.
        clip_filter: ``"openai/clip-vit-base-patch16"``, ``"test_clip"`` or null (keep all classes).
        cache_dir: support sets and prototypes (default ``$DIFFPERC_CACHE/ovseg``).
        n_support ... seed: :class:`~diffperc.zeroshot.ovseg.segmenter.OVDiff` settings (released defaults).
        save_predictions: write pictures of the first this many test images.
        save_support: write one picture per class of its support set and masks.
        output_dir: where pictures and ``miou.json`` go; None = the trainer's root dir.
    """

    def __init__(
        self, backbone: str = "sd15", backbone_kwargs: dict[str, Any] | None = None,
        extractors: Sequence[str] = ("sd", "dino_vitb8", "clip_vitb16"), mask_proposer: str = "threshold",
        clip_filter: str | None = "openai/clip-vit-base-patch16", cache_dir: str | None = None, n_support: int = 32,
        support_seed: int = 42, template: str = TEMPLATE, negative_prompt: str | None = NEGATIVE_PROMPT,
        guidance_scale: float = 8.0, num_inference_steps: int = 30, sample_batch_size: int = 8,
        support_size: int | None = None, kmeans: int = 32, sd_layers: str | list[str] = "ovdiff", sd_timestep: int = 200,
        sd_feat_size: int | None = None, sd_input_size: int | None = None, proto_seed: int = 43, vit_size: int = 448,
        size: int = 448, crops: Sequence[int] = (448, 336), strides: Sequence[int] = (224, 224),
        feat_mode: str = "all", stuff_threshold: float = 0.85, threshold: float = 0.0, topk: int = 10,
        pamr: bool = False, fg_thresh: float = 0.5, bg_thresh: float = 0.2, seed: int = 0, progress: bool = True,
        save_predictions: int = 20, save_support: bool = True, output_dir: str | None = None,
    ) -> None:
        super().__init__(backbone, backbone_kwargs)
        if save_predictions < 0:
            raise ValueError(f"save_predictions must be >= 0, got {save_predictions}")
        self.ovdiff_kwargs = dict(
            extractors=list(extractors), mask_proposer=mask_proposer, clip_filter=clip_filter, cache_dir=cache_dir,
            n_support=n_support, support_seed=support_seed, template=template, negative_prompt=negative_prompt,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, sample_batch_size=sample_batch_size,
            support_size=support_size, kmeans=kmeans, sd_layers=sd_layers, sd_timestep=sd_timestep,
            sd_feat_size=sd_feat_size, sd_input_size=sd_input_size, proto_seed=proto_seed, vit_size=vit_size, size=size,
            crops=list(crops), strides=list(strides), feat_mode=feat_mode, stuff_threshold=stuff_threshold,
            threshold=threshold, topk=topk, pamr=pamr, fg_thresh=fg_thresh, bg_thresh=bg_thresh, seed=seed,
            progress=progress)
        self.save_predictions, self.save_support, self.output_dir = save_predictions, save_support, output_dir
        self.ovdiff: OVDiff | None = None
        self.metrics: SegMetrics | None = None
        self.results: dict[str, Any] = {}
        self._saved = 0

    def configure_optimizers(self) -> None:  # training-free
        return None

    def _out_dir(self) -> Path:
        return Path(self.output_dir or self.trainer.default_root_dir)

    def _writes(self) -> bool:
        return self.output_dir is not None or not self.trainer.fast_dev_run  # smoke runs leave no files behind

    def _prepare(self) -> None:
        dm = self.trainer.datamodule
        for attr in ("classes", "eval_classes", "reduce_zero_label"):
            if not hasattr(dm, attr):
                raise TypeError(f"OVSegTask needs a DataModule with .{attr} (diffperc.data.ovseg.OVSegDataModule), "
                                f"got {type(dm).__name__}")
        if self.ovdiff is None or self.ovdiff.classes != list(dm.classes):
            self.ovdiff = self.ovdiff or OVDiff(self.backbone, **self.ovdiff_kwargs)
            self.ovdiff.prepare(dm.classes, getattr(dm, "prompts", {}), getattr(dm, "stuff", ()))
            if self.save_support and self._writes() and self.trainer.is_global_zero:
                from ..viz import save_png

                for c in dm.classes:
                    save_png(self.ovdiff.support_picture(c), self._out_dir() / "support" / f"{slug(c)}.png")
        self.eval_classes, self.drop_background = list(dm.eval_classes), bool(dm.reduce_zero_label)
        self.metrics = SegMetrics(len(self.eval_classes), ignore_index=255)
        self._saved = 0

    def _eval_step(self, batch: dict[str, list[Any]]) -> None:
        for image, mask, name in zip(batch["image"], batch["mask"], batch["name"], strict=True):
            pred = self.ovdiff.predict(image, size=tuple(mask.shape[-2:]), drop_background=self.drop_background)
            self.metrics.update(pred[None].cpu(), mask[None].cpu().long())
            if self._saved < self.save_predictions and self._writes() and self.trainer.is_global_zero:
                from ..viz import save_png

                save_png(prediction_picture(image, pred, self.eval_classes, gt=mask),
                         self._out_dir() / "predictions" / f"{self._saved:04d}_{slug(name)}.png")
                self._saved += 1

    def _epoch_end(self, stage: str) -> None:
        res = self.metrics.compute()
        iou = res["iou"]
        self.results = {"miou": float(res["miou"]), "pixel_acc": float(res["pixel_acc"]),
                        "iou": {c: float(v) for c, v in zip(self.eval_classes, iou.tolist(), strict=True)}}
        self.log(f"{stage}/miou", res["miou"], prog_bar=True)
        self.log(f"{stage}/pixel_acc", res["pixel_acc"])
        rows = "\n".join(f"  {c:<16} {100 * v:6.2f}" for c, v in self.results["iou"].items())
        self.print(f"\n{stage} mIoU {100 * self.results['miou']:.2f} over {len(self.eval_classes)} classes\n{rows}")
        if self._writes() and self.trainer.is_global_zero:
            write_text_atomic(self._out_dir() / "miou.json", json.dumps(self.results, indent=1))

    def on_test_start(self) -> None:
        self._prepare()

    def on_validation_start(self) -> None:
        self._prepare()

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        self._eval_step(batch)

    def validation_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def predict_step(self, batch: dict[str, list[Any]], batch_idx: int) -> list[torch.Tensor]:
        """Label maps (H, W) of the batch's images."""
        if self.ovdiff is None or not self.ovdiff.banks:
            self._prepare()
        return [self.ovdiff.predict(img, drop_background=self.drop_background) for img in batch["image"]]
