"""Open-vocabulary (camouflaged) instance segmentation on frozen diffusion features: the OVCIS recipe.

Vu et al., "Leveraging Open-Vocabulary Diffusion to Camouflaged Instance Segmentation" (arXiv
2312.17505): frozen SD UNet features and a frozen CLIP text encoder; trained: MSFF, a Mask2Former
mask generator, TVA and CIN (:class:`~diffperc.heads.instance.OVCISHead`), with Hungarian-matched
CE + BCE + Dice losses and deep supervision (:class:`~diffperc.heads.mask2former.SetCriterion`).
Class names are text at train and test time: ``class_names`` (or the datamodule's) are embedded
with the backbone's CLIP text encoder (SD 1.5's is CLIP ViT-L/14's), pooled output averaged over
``templates``; ``test_class_names`` renames or adds classes at test time without retraining.
Evaluation: COCO mask AP / AP50 / AP75 / APs / APm / APl (``metrics_instance``) at the original
image size. ``predict`` writes ``<name>.png`` (instances drawn over the image) and ``<name>.json``
(RLE masks, class names, scores).

    diffperc fit  --config configs/camouflage/cod10k_ovcis_sd15.yaml
    diffperc test --config configs/camouflage/nc4k_ovcis_sd15.yaml --ckpt_path <.ckpt>
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from PIL import Image, ImageDraw
from torch import Tensor

from .. import viz
from .._io import write_text_atomic
from ..feature_cache import FeatureCache, tensor_key
from ..heads.instance import OVCISHead
from ..heads.mask2former import SetCriterion
from ..metrics_instance import InstanceAP, encode_masks
from ._dense import DenseTask, pad_images
from ._text import class_embeddings

__all__ = ["FROZEN_BACKBONE", "InstanceSegTask", "image_instances", "instance_overlay", "predict_folder"]

# ODISE's tap (t = 0, no noise: the clean latents), the four decoder levels (1/8 .. 1/64 on SD 1.5).
FROZEN_BACKBONE: dict[str, Any] = {"layers": "vpd", "timestep": 0, "add_noise": False}
TEMPLATES = ("a photo of a {}.",)


def image_instances(class_logits: Tensor, mask_logits: Tensor, valid: Sequence[int], padded: Sequence[int],
                    out_size: Sequence[int], max_instances: int = 100, threshold: float = 0.0) -> dict[str, Tensor]:
    """Mask2Former instance inference of one image, masks at its original size.

    Args:
        class_logits: (Q, K + 1); mask_logits: (Q, h, w) over the padded input.
        valid: (h, w) of the image inside the padded input; padded: (H', W') of the input.
        out_size: (H, W) of the original image.
        max_instances: top-k (query, class) pairs; threshold: minimum score.

    Returns:
        ``scores`` (N,), ``labels`` (N,) in [0, K), ``masks`` (N, H, W) bool.
    """
    k = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1]  # (Q, K)
    top = probs.flatten().topk(min(max_instances, probs.numel()))
    query = top.indices // k
    logits = F.interpolate(mask_logits[query][None].float(), size=tuple(padded), mode="bilinear", align_corners=False)
    logits = logits[..., : int(valid[0]), : int(valid[1])]
    logits = F.interpolate(logits, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)[0]
    masks = logits > 0
    mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = top.values * mask_score
    keep = scores >= threshold
    return {"scores": scores[keep], "labels": (top.indices % k)[keep], "masks": masks[keep]}


def instance_overlay(image: Tensor, pred: dict[str, Tensor], class_names: Sequence[str], score_threshold: float = 0.5,
                     alpha: float = 0.5) -> Image.Image:
    """Instances over the image: one colour each (highest score drawn on top), "name score" at each centre.

    Args:
        image: (3, H, W) in [0, 1]; pred: ``masks`` (N, H, W), ``labels``, ``scores`` (N,).
        class_names: K names; score_threshold: instances drawn; alpha: colour weight.
    """
    keep = (pred["scores"] >= score_threshold).nonzero().flatten().tolist()
    keep = sorted(keep, key=lambda i: float(pred["scores"][i]))  # the best last, on top
    ids = torch.full(image.shape[-2:], 255, dtype=torch.long)
    for j, i in enumerate(keep):
        ids[pred["masks"][i].to(ids.device).bool()] = j % 255
    out = viz.mask_overlay(image, ids, alpha=alpha)
    draw = ImageDraw.Draw(out)
    for i in keep:
        ys, xs = pred["masks"][i].nonzero(as_tuple=True)
        if len(ys):
            text = f"{class_names[int(pred['labels'][i])]} {float(pred['scores'][i]):.2f}"
            draw.text((float(xs.float().mean()), float(ys.float().mean())), text, fill=(255, 255, 255))
    return out


class InstanceSegTask(DenseTask):
    """Query-based instance segmentation with text classes on a frozen diffusion backbone.

    Args:
        backbone, backbone_kwargs: see :class:`~diffperc.tasks._base.PerceptionTask`; None builds
            :data:`FROZEN_BACKBONE` (decoder taps at t = 0 on clean latents, frozen).
        class_names: the training classes (prompts); None = the datamodule's ``class_names``.
        test_class_names: classes used by validate/test/predict instead (open vocabulary); None = class_names.
        templates: prompts with one ``{}`` for the name, embeddings averaged (default "a photo of a {}.").
        background_prompt: the no-object class's text (mean-normalisation reference of TVA).
        prompt_max_length: tokens per prompt (None: the text encoder's maximum).
        hidden_dim, mask_dim, num_queries, decoder_layers, encoder_layers, num_heads, dim_feedforward,
            encoder_feedforward_dim, msff, cin, tva: :class:`~diffperc.heads.instance.OVCISHead`.
        class_weight, mask_weight, dice_weight, no_object_weight, num_points, oversample, importance:
            :class:`~diffperc.heads.mask2former.SetCriterion` (Mask2Former: 2, 5, 5, 0.1, 12544, 3, 0.75).
        max_instances, score_threshold: inference (top 100, no threshold for AP).
        overlay_threshold: instances drawn by ``predict``.
        feature_cache: a folder for an on-disk cache of the frozen backbone's features
            (:class:`~diffperc.feature_cache.FeatureCache`): each distinct input image (keyed by a hash
            of its padded pixels, so a flipped copy is its own entry) runs the backbone once, later
            epochs and runs read the features back. None (default) computes them every time. Needs a
            frozen backbone; with ``add_noise=True`` the first noise draw is the one kept.
        optimizer, lr_schedule, poly_power, warmup_steps, output_dir: see :class:`DenseTask`
            (Mask2Former: AdamW 1e-4, weight decay 0.05, poly 0.9).
    """

    DEFAULT_BACKBONE_KWARGS = FROZEN_BACKBONE

    def __init__(
        self, backbone: str = "sd15", backbone_kwargs: dict[str, Any] | None = None,
        class_names: list[str] | None = None, test_class_names: list[str] | None = None,
        templates: list[str] | None = None, background_prompt: str = "background", prompt_max_length: int | None = None,
        hidden_dim: int = 256, mask_dim: int = 256, num_queries: int = 100, decoder_layers: int = 10,
        encoder_layers: int = 6, num_heads: int = 8, dim_feedforward: int = 2048, encoder_feedforward_dim: int = 1024,
        msff: bool = True, cin: bool = True, tva: bool = True, class_weight: float = 2.0, mask_weight: float = 5.0,
        dice_weight: float = 5.0, no_object_weight: float = 0.1, num_points: int | None = 12544,
        oversample: float = 3.0, importance: float = 0.75, max_instances: int = 100, score_threshold: float = 0.0,
        overlay_threshold: float = 0.5, optimizer: OptimizerCallable = torch.optim.AdamW, lr_schedule: str = "poly",
        poly_power: float = 0.9, warmup_steps: int = 0, output_dir: str | None = None,
        feature_cache: str | None = None,
    ) -> None:
        super().__init__(backbone, backbone_kwargs, optimizer, 0.1, lr_schedule, warmup_steps, 1e-6, poly_power,
                         0.0, 0.48, output_dir, "plain")
        self.class_names = list(class_names) if class_names is not None else None
        self.test_class_names = list(test_class_names) if test_class_names is not None else None
        self.templates = list(templates) if templates else list(TEMPLATES)
        self.background_prompt = background_prompt
        te = self.backbone.text_encoder
        limit = int(te.config.max_position_embeddings)
        self.prompt_max_length = min(prompt_max_length or limit, limit)
        info = self.backbone.feature_info
        self.head = OVCISHead(info.channels(), info.reductions(), te.config.hidden_size, hidden_dim, mask_dim,
                              num_queries, decoder_layers, encoder_layers, num_heads, dim_feedforward,
                              encoder_feedforward_dim, msff=msff, cin=cin, tva=tva)
        self.criterion = SetCriterion(class_weight, mask_weight, dice_weight, no_object_weight, num_points,
                                      oversample, importance)
        self.max_instances, self.score_threshold = max_instances, score_threshold
        self.overlay_threshold = overlay_threshold
        self._text_cache: dict[tuple[str, ...], Tensor] = {}
        self.metrics: InstanceAP | None = None
        self.results: dict[str, float] = {}
        self.feature_cache = feature_cache
        self._cache: FeatureCache | None = None

    # ------------------------------------------------------------------ classes as text
    def setup(self, stage: str) -> None:
        if self.class_names is None:
            names = self.datamodule_names("class_names")
            if names is None:
                raise ValueError("InstanceSegTask needs class names: set model.init_args.class_names or use a "
                                 "datamodule with a class_names attribute (CamouflageDataModule has one)")
            self.class_names = names
            self.hparams["class_names"] = names

    def eval_class_names(self) -> list[str]:
        names = self.test_class_names or self.class_names
        if not names:
            raise RuntimeError("InstanceSegTask has no class names yet: pass class_names")
        return list(names)

    def text_embeddings(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(K, D) class-name embeddings and the (D,) background embedding (cached per name list)."""
        key = (*names, "\0", self.background_prompt, *self.templates)
        if key not in self._text_cache:
            bb = self.backbone
            table = class_embeddings(bb.text_encoder, bb.tokenizer, list(names), self.templates, self.prompt_max_length)
            bg = class_embeddings(bb.text_encoder, bb.tokenizer, [self.background_prompt], ["{}"],
                                  self.prompt_max_length)[0]
            self._text_cache = {key: torch.cat([table, bg[None]])}
        both = self._text_cache[key].to(self.device)
        return both[:-1], both[-1]

    # ------------------------------------------------------------------ forward
    def features(self, images: Tensor) -> list[Tensor]:
        """Frozen backbone maps of images padded to the backbone's size multiple (grey): one (B, C_i, h_i, w_i)
        per tap, read from ``feature_cache`` where the same padded image was seen before."""
        padded = pad_images(images, self.backbone.size_multiple)
        if self.feature_cache is None:
            return self._backbone_features(padded)
        cache = self.backbone_feature_cache()
        n = len(self.backbone.feature_info)

        def compute(pos: list[int]) -> list[dict[str, Tensor]]:
            feats = self._backbone_features(padded[pos])
            return [{f"f{j}": f[k] for j, f in enumerate(feats)} for k in range(len(pos))]

        items = cache.get_or_compute([tensor_key(x) for x in padded], compute)
        return [torch.stack([it[f"f{j}"] for it in items]).to(images.device) for j in range(n)]

    def _backbone_features(self, padded: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return [f.float() for f in self.backbone(padded).features]

    def backbone_feature_cache(self) -> FeatureCache:
        """The :class:`FeatureCache` of this backbone setting under ``feature_cache``."""
        if self._cache is None:
            if any(p.requires_grad for p in self.backbone.parameters()):
                raise ValueError("feature_cache needs a frozen backbone (its features must not change in training); "
                                 "drop feature_cache or freeze the backbone")
            params = list(self.backbone.parameters())
            probe = torch.cat([p.detach().flatten()[:256].float().cpu() for p in params[:4] + params[-4:]])
            setting = {"backbone": str(self.hparams.get("backbone")),
                       "backbone_kwargs": self.hparams.get("backbone_kwargs") or self.DEFAULT_BACKBONE_KWARGS,
                       "class": type(self.backbone).__name__, "weights": tensor_key(probe),
                       "dtype": str(params[0].dtype) if params else "none"}
            self._cache = FeatureCache(self.feature_cache, setting, "instance")
        return self._cache

    def forward(self, images: Tensor, class_names: Sequence[str] | None = None) -> dict[str, list[Tensor]]:
        """(B, 3, H, W) in [0, 1] -> per-layer ``class_logits`` (B, Q, K + 1) and ``mask_logits``."""
        names = class_names if class_names is not None else self.eval_class_names()
        cls, bg = self.text_embeddings(names)
        return self.head(self.features(images), cls, bg)

    @staticmethod
    def targets(batch: dict[str, Any]) -> list[dict[str, Tensor]]:
        """Training targets without crowd regions: ``labels`` (T,), ``masks`` (T, H, W) float."""
        out = []
        crowd = batch.get("iscrowd") or [torch.zeros(len(x), dtype=torch.long) for x in batch["labels"]]
        for labels, masks, c in zip(batch["labels"], batch["masks"], crowd, strict=True):
            keep = c == 0
            out.append({"labels": labels[keep], "masks": masks[keep].float()})
        return out

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        outputs = self(batch["image"], self.class_names)
        loss, parts = self.criterion(outputs, self.targets(batch))
        n = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)
        return loss

    @torch.no_grad()
    def predict_instances(self, batch: dict[str, Any], class_names: Sequence[str] | None = None
                          ) -> list[dict[str, Tensor]]:
        """Per image ``scores``, ``labels``, ``masks`` (N, H, W) at its ``orig_size`` (or the input size)."""
        images = batch["image"]
        out = self(images, class_names)
        cl, ml = out["class_logits"][-1], out["mask_logits"][-1]
        padded = pad_images(images, self.backbone.size_multiple).shape[-2:]
        sizes = batch.get("size", torch.tensor([list(images.shape[-2:])] * len(images)))
        orig = batch.get("orig_size", sizes)
        return [image_instances(cl[i], ml[i], sizes[i].tolist(), padded, orig[i].tolist(), self.max_instances,
                                self.score_threshold) for i in range(len(images))]

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if self.metrics is None:
            self.metrics = InstanceAP(len(self.eval_class_names()), self.max_instances)
        preds = self.predict_instances(batch)
        masks = batch.get("orig_masks", batch["masks"])
        crowd = batch.get("iscrowd") or [torch.zeros(len(x), dtype=torch.long) for x in batch["labels"]]
        for p, m, lab, c in zip(preds, masks, batch["labels"], crowd, strict=True):
            self.metrics.update({k: v.cpu() for k, v in p.items()},
                                {"masks": m.cpu(), "labels": lab.cpu(), "iscrowd": c.cpu()})

    def on_validation_epoch_start(self) -> None:
        self.metrics = None

    on_test_epoch_start = on_validation_epoch_start

    def _log_metrics(self, stage: str) -> None:
        if self.metrics is None:
            return
        self.results = self.metrics.compute()
        self.log_dict({f"{stage}/{k}": v for k, v in self.results.items() if np.isfinite(v)}, sync_dist=False)
        self.metrics = None

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Writes ``<name>.png`` (instances over the original image) and ``<name>.json`` per image."""
        preds = self.predict_instances(batch)
        names = self.batch_names(batch, batch_idx)
        for i, (name, pred) in enumerate(zip(names, preds, strict=True)):
            image = batch["orig_image"][i] if "orig_image" in batch else self._valid_image(batch, i)
            write_prediction(self.prediction_stem(name), image, {k: v.cpu() for k, v in pred.items()},
                             self.eval_class_names(), self.overlay_threshold)
        return [{k: v.cpu() for k, v in p.items()} for p in preds]

    @staticmethod
    def _valid_image(batch: dict[str, Any], i: int) -> Tensor:
        img = batch["image"][i].cpu()
        if "size" not in batch:
            return img
        h, w = batch["size"][i].tolist()
        out = img[:, :h, :w]
        return F.interpolate(out[None], size=tuple(batch["orig_size"][i].tolist()), mode="bilinear",
                             align_corners=False)[0].clamp(0, 1)


def write_prediction(stem: Path, image: Tensor, pred: dict[str, Tensor], class_names: Sequence[str],
                     overlay_threshold: float = 0.5) -> tuple[Path, Path]:
    """``<stem>.png`` overlay and ``<stem>.json`` ({"instances": [{"label", "class_name", "score", "segmentation"}]})."""
    png = viz.save_png(instance_overlay(image, pred, class_names, overlay_threshold), stem.with_name(stem.name + ".png"))
    rles = encode_masks(pred["masks"]) if len(pred["masks"]) else []
    records = [{"label": int(lab), "class_name": class_names[int(lab)], "score": round(float(s), 6), "segmentation": r}
               for lab, s, r in zip(pred["labels"].tolist(), pred["scores"].tolist(), rles, strict=True)]
    js = write_text_atomic(stem.with_name(stem.name + ".json"),
                           json.dumps({"height": int(image.shape[-2]), "width": int(image.shape[-1]),
                                       "class_names": list(class_names), "instances": records}))
    return png, js


@torch.no_grad()
def predict_folder(task: InstanceSegTask, input_dir: str | Path, output_dir: str | Path, image_size: int = 512,
                   class_names: Sequence[str] | None = None, overlay_threshold: float | None = None,
                   progress: bool = True) -> list[Path]:
    """Instance overlays (PNG) and RLE JSONs for every image under ``input_dir`` (the library side of
    ``diffperc predict``).

    Args:
        task: a trained task (e.g. ``InstanceSegTask.load_from_checkpoint(path)``), on its device.
        input_dir: images (searched recursively); output_dir: written as ``<relative_name>.png/.json``.
        image_size: letterbox side (a multiple of the backbone's size multiple).
        class_names: the vocabulary (default: the task's test/training class names).
        overlay_threshold: instances drawn (default: the task's).

    Returns:
        the PNG paths written.
    """
    from tqdm.auto import tqdm

    from ..data.camouflage import ImageFolderDataset

    ds = ImageFolderDataset(input_dir, image_size)
    names = list(class_names) if class_names is not None else task.eval_class_names()
    out_dir = Path(output_dir)
    written = []
    task.eval()
    for i in tqdm(range(len(ds)), desc="predict", disable=not progress):
        item = ds[i]
        batch = {"image": item["image"][None].to(task.device), "size": item["size"][None],
                 "orig_size": item["orig_size"][None]}
        pred = {k: v.cpu() for k, v in task.predict_instances(batch, names)[0].items()}
        stem = out_dir / Path(item["name"]).with_suffix("").as_posix().replace("/", "_")
        png, _ = write_prediction(stem, item["orig_image"], pred, names,
                                  task.overlay_threshold if overlay_threshold is None else overlay_threshold)
        written.append(png)
    return written
