"""COCO mask AP of instance segmentation (pycocotools ``COCOeval``, ``iouType="segm"``, RLE masks).

What the camouflaged-instance papers report (OSFormer, DCNet, OVCIS): AP (IoU 0.50:0.05:0.95),
AP50, AP75 and, where objects of those sizes exist, APs / APm / APl (area < 32^2, 32^2-96^2,
> 96^2 pixels), on COCO's 101-point interpolated precision, 100 detections per image. Values are
percent (detectron2's ``COCOEvaluator`` convention); a size range without ground truth gives NaN
(COCOeval's -1). Needs the ``coco`` extra: ``pip install "diffperc[coco]"``.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["InstanceAP", "coco_mask_ap", "decode_rle", "encode_masks"]

_STATS = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def _mask_api() -> Any:
    try:
        from pycocotools import mask as mask_api
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('instance metrics and COCO-style datasets need pycocotools: pip install "diffperc[coco]"') from err
    return mask_api


def encode_masks(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) bool / {0, 1} masks -> N COCO compressed RLEs (``counts`` as str, JSON-ready)."""
    m = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
    rles = _mask_api().encode(np.asfortranarray(m.astype(np.uint8).transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def decode_rle(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """COCO RLEs -> (N, H, W) uint8 masks."""
    if not rles:
        raise ValueError("decode_rle needs at least one RLE")
    enc = [dict(r, counts=r["counts"].encode("ascii")) if isinstance(r["counts"], str) else r for r in rles]
    return _mask_api().decode(enc).transpose(2, 0, 1)


def coco_mask_ap(gt: dict[str, Any], predictions: list[dict[str, Any]]) -> dict[str, float]:
    """Run COCOeval (segm) on an in-memory ground truth dict and a list of result dicts.

    Args:
        gt: COCO dict with ``images`` (id, height, width), ``annotations`` (id, image_id, category_id,
            segmentation RLE, area, iscrowd, bbox) and ``categories``.
        predictions: ``image_id``, ``category_id``, ``segmentation`` (RLE), ``score``.

    Returns:
        {"ap", "ap50", "ap75", "aps", "apm", "apl"} in percent (NaN where undefined).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    nan = dict.fromkeys(_STATS, math.nan)
    if not gt["annotations"]:
        return nan
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not predictions:
            return {**nan, **{k: 0.0 for k in ("ap", "ap50", "ap75")}}
        coco_dt = coco_gt.loadRes(predictions)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) * 100 if v >= 0 else math.nan) for k, v in zip(_STATS, ev.stats[:6], strict=True)}


class InstanceAP:
    """Accumulates ground truth and predicted instances of a set, then :func:`coco_mask_ap`.

    Args:
        num_classes: K; category ids are 1..K in the COCO structures (labels are 0-based here).
        max_detections: predictions kept per image, highest scores first (COCO: 100).
    """

    def __init__(self, num_classes: int, max_detections: int = 100) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.max_detections = num_classes, max_detections
        self.reset()

    def reset(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def update(self, pred: dict[str, Tensor], target: dict[str, Tensor]) -> None:
        """One image.

        Args:
            pred: ``masks`` (N, H, W) bool, ``labels`` (N,) in [0, K), ``scores`` (N,).
            target: ``masks`` (T, H, W), ``labels`` (T,) in [0, K), optional ``iscrowd`` (T,).
        """
        h, w = target["masks"].shape[-2:]
        if pred["masks"].numel() and tuple(pred["masks"].shape[-2:]) != (h, w):
            raise ValueError(f"predicted masks are {tuple(pred['masks'].shape[-2:])} but the target is {(h, w)}")
        for name, lab in (("pred", pred["labels"]), ("target", target["labels"])):
            if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(f"{name} labels must be in [0, {self.num_classes}), got {lab.tolist()[:10]}")
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": int(h), "width": int(w)})
        crowd = target.get("iscrowd", torch.zeros(len(target["labels"]), dtype=torch.long))
        if len(target["labels"]):
            mask_api = _mask_api()
            for rle, lab, c in zip(encode_masks(target["masks"].bool()), target["labels"].tolist(), crowd.tolist(),
                                   strict=True):
                enc = dict(rle, counts=rle["counts"].encode("ascii"))
                self.annotations.append({
                    "id": len(self.annotations) + 1, "image_id": image_id, "category_id": int(lab) + 1,
                    "segmentation": rle, "area": float(mask_api.area(enc)),
                    "bbox": [float(v) for v in mask_api.toBbox(enc)], "iscrowd": int(c)})
        order = pred["scores"].argsort(descending=True)[: self.max_detections]
        if len(order):
            rles = encode_masks(pred["masks"][order].bool())
            for rle, lab, s in zip(rles, pred["labels"][order].tolist(), pred["scores"][order].tolist(), strict=True):
                self.results.append({"image_id": image_id, "category_id": int(lab) + 1, "segmentation": rle,
                                     "score": float(s)})

    def _gathered(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """All processes' records, image ids renumbered (DDP); the local ones otherwise."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.images, self.annotations, self.results
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (self.images, self.annotations, self.results))
        images, anns, res = [], [], []
        for imgs, a, r in parts:
            offset = len(images)
            images += [dict(i, id=i["id"] + offset) for i in imgs]
            anns += [dict(x, image_id=x["image_id"] + offset, id=len(anns) + j + 1) for j, x in enumerate(a)]
            res += [dict(x, image_id=x["image_id"] + offset) for x in r]
        return images, anns, res

    def compute(self) -> dict[str, float]:
        """{"ap", "ap50", "ap75", "aps", "apm", "apl"} in percent over every image seen."""
        images, anns, res = self._gathered()
        cats = [{"id": k + 1, "name": str(k)} for k in range(self.num_classes)]
        return coco_mask_ap({"images": images, "annotations": anns, "categories": cats}, res)
