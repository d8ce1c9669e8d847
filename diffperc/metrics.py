"""Dense-task metrics with the exact definitions of the papers diffperc follows.

Depth (GLPDepth / VPD ``depth/utils_depth/metrics.py``; Eigen et al. 2014): per image, over valid
pixels ``min_depth < gt < max_depth`` (inside the Eigen crop on NYUv2), with r = max(pred/gt, gt/pred):

    d1, d2, d3  fraction of pixels with r < 1.25, 1.25^2, 1.25^3
    abs_rel     mean |pred - gt| / gt            sq_rel   mean (pred - gt)^2 / gt
    rmse        sqrt(mean (pred - gt)^2)         rmse_log sqrt(mean (log pred - log gt)^2)
    log10       mean |log10 pred - log10 gt|     silog    sqrt(mean d^2 - 0.5 mean(d)^2), d = log pred - log gt

then averaged over images (VPD's test.py). As in VPD, Inf predictions become max_depth and NaN
ones min_depth; predictions below min_depth are raised to it so the logs stay finite (VPD's
sigmoid * max_depth never goes that low). silog is not multiplied by 100 (VPD; BTS does).

Semantic segmentation (mmsegmentation): a confusion matrix over pixels whose label is not
``ignore_index`` (255); IoU_k = TP / (TP + FP + FN), mIoU = mean over classes that occur in the
labels or the predictions of the whole set; pixel accuracy = correct / labelled pixels.

Referring segmentation (LAVT, github.com/yz93/LAVT-RIS): per sample I = |pred & gt|, U = |pred | gt|;
overall IoU = sum I / sum U over the set, mean IoU = mean of I / U (0 where U = 0), precision@k =
fraction of samples with IoU >= k (LAVT counts ``this_iou >= eval_seg_iou``), k = 0.5 ... 0.9.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "DEPTH_KEYS", "DepthMetrics", "RefSegMetrics", "SegMetrics", "confusion_matrix", "depth_metrics",
    "eigen_crop_mask", "per_image_depth_metrics", "refseg_stats", "seg_scores",
]

DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3")
REFSEG_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
_EIGEN = (45, 471, 41, 601)  # rows 45:471, cols 41:601 of the 480 x 640 NYUv2 ground truth
_CROPS = (None, "eigen")


# ---- depth ---------------------------------------------------------------------------------


def eigen_crop_mask(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """The Eigen evaluation crop of NYUv2 as an (h, w) bool mask.

    Exactly rows 45:471 and cols 41:601 at the native 480 x 640; at any other size the same
    fractions of the image (bounds rounded), so a prediction evaluated at a resized ground truth
    is cropped to the same region.
    """
    if h < 1 or w < 1:
        raise ValueError(f"eigen_crop_mask: h and w must be >= 1, got {h} x {w}")
    top, bottom = round(_EIGEN[0] * h / 480), round(_EIGEN[1] * h / 480)
    left, right = round(_EIGEN[2] * w / 640), round(_EIGEN[3] * w / 640)
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[top:bottom, left:right] = True
    return mask


def _as_maps(x: Tensor, name: str) -> Tensor:
    """(B, 1, H, W), (B, H, W) or (H, W) -> (B, H, W)."""
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 3:
        return x
    if x.ndim == 2:
        return x[None]
    raise ValueError(f"{name} must be (B, 1, H, W), (B, H, W) or (H, W), got {tuple(x.shape)}")


def per_image_depth_metrics(pred: Tensor, target: Tensor, min_depth: float = 1e-3, max_depth: float = 10.0,
                            crop: str | None = None) -> tuple[Tensor, Tensor]:
    """Depth metrics of each image.

    Args:
        pred: (B, 1, H, W), (B, H, W) or (H, W) predicted depth in metres.
        target: same shape, ground truth in metres; pixels outside (min_depth, max_depth) (0 =
            missing) are not evaluated.
        min_depth, max_depth: evaluation range (VPD NYUv2: 1e-3, 10).
        crop: None, or "eigen" for the NYUv2 Eigen crop (see :func:`eigen_crop_mask`).

    Returns:
        (values, has_valid): values (B, 9) float32 in ``DEPTH_KEYS`` order (0 for images without a
        valid pixel), has_valid (B,) bool.
    """
    if crop not in _CROPS:
        raise ValueError(f"crop must be one of {_CROPS}, got {crop!r}")
    if not 0 <= min_depth < max_depth:
        raise ValueError(f"need 0 <= min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
    p, t = _as_maps(pred, "pred").float(), _as_maps(target, "target").float()
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    p = torch.nan_to_num(p, nan=min_depth, posinf=max_depth, neginf=min_depth).clamp_min(max(min_depth, 1e-12))
    valid = (t > min_depth) & (t < max_depth)
    if crop == "eigen":
        valid &= eigen_crop_mask(*t.shape[-2:], device=t.device)
    values = torch.zeros(len(p), len(DEPTH_KEYS), device=p.device)
    for i in range(len(p)):
        if valid[i].any():
            values[i] = _depth_values(p[i][valid[i]], t[i][valid[i]])
    return values, valid.flatten(1).any(dim=1)


def _depth_values(p: Tensor, t: Tensor) -> Tensor:
    """(N,) predicted and true depths of one image -> (9,) metrics in ``DEPTH_KEYS`` order."""
    ratio = torch.maximum(p / t, t / p)
    diff, dlog = p - t, torch.log(p) - torch.log(t)
    return torch.stack([
        (diff.abs() / t).mean(),
        (diff**2 / t).mean(),
        (diff**2).mean().sqrt(),
        (dlog**2).mean().sqrt(),
        (torch.log10(p) - torch.log10(t)).abs().mean(),
        ((dlog**2).mean() - 0.5 * dlog.mean() ** 2).clamp_min(0).sqrt(),
        (ratio < 1.25).float().mean(),
        (ratio < 1.25**2).float().mean(),
        (ratio < 1.25**3).float().mean(),
    ])


def depth_metrics(pred: Tensor, target: Tensor, min_depth: float = 1e-3, max_depth: float = 10.0,
                  crop: str | None = None) -> dict[str, Tensor]:
    """Depth metrics averaged over the images that have valid pixels (see :func:`per_image_depth_metrics`).

    Returns:
        {key: scalar tensor} for ``DEPTH_KEYS``; NaN when no image has a valid pixel.
    """
    values, ok = per_image_depth_metrics(pred, target, min_depth, max_depth, crop)
    mean = values[ok].mean(dim=0) if ok.any() else torch.full((len(DEPTH_KEYS),), float("nan"))
    return dict(zip(DEPTH_KEYS, mean.unbind(), strict=True))


class DepthMetrics(Metric):
    """Accumulates per-image depth metrics over a set; ``compute()`` gives their means.

    Args: as :func:`per_image_depth_metrics`. Images without valid pixels are not counted.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, crop: str | None = None) -> None:
        super().__init__()
        if crop not in _CROPS:
            raise ValueError(f"DepthMetrics: crop must be one of {_CROPS}, got {crop!r}")
        self.min_depth, self.max_depth, self.crop = min_depth, max_depth, crop
        # float64 sums: VPD accumulates Python floats; float32 would drift over thousands of images
        self.add_state("sums", default=torch.zeros(len(DEPTH_KEYS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (B, 1, H, W) depth in metres (target 0 = missing)."""
        values, ok = per_image_depth_metrics(pred, target, self.min_depth, self.max_depth, self.crop)
        self.sums += values[ok].to(self.sums).sum(dim=0)
        self.count += ok.sum().to(self.count)

    def compute(self) -> dict[str, Tensor]:
        """{key: float32 scalar}: the float64 means over the images, cast once at the end."""
        mean = self.sums / self.count if self.count > 0 else torch.full_like(self.sums, float("nan"))
        return dict(zip(DEPTH_KEYS, mean.float().unbind(), strict=True))


# ---- semantic segmentation -----------------------------------------------------------------


def _labels(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Logits (B, K, H, W) -> labels (B, H, W); labels pass through. Shapes checked against target."""
    if pred.is_floating_point():
        if pred.ndim != 4 or pred.shape[1] != num_classes:
            raise ValueError(f"float pred must be logits (B, {num_classes}, H, W), got {tuple(pred.shape)}")
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"pred labels {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    return pred


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """(K, K) int64 pixel counts, rows = true class, columns = predicted class.

    Args:
        pred: (B, H, W) int class ids, or (B, K, H, W) logits (argmax is taken).
        target: (B, H, W) int class ids in [0, K) or ``ignore_index``.
        num_classes: K.
        ignore_index: label of pixels that are not counted (ADE20K: 255); None = none.
    """
    if target.is_floating_point():
        raise TypeError(f"target must hold int class ids, got dtype {target.dtype}")
    pred = _labels(pred, target, num_classes).long()
    t = target.long()
    keep = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    t, pred = t[keep], pred[keep]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"target has class ids {bad} outside [0, {num_classes}) that are not ignore_index "
                         f"({ignore_index})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"pred has class ids outside [0, {num_classes}): {pred.unique()[:5].tolist()}")
    return torch.bincount(t * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def seg_scores(confmat: Tensor) -> dict[str, Tensor]:
    """Scores of a (K, K) confusion matrix (rows true, columns predicted).

    Returns:
        {"miou": mean IoU over classes with TP + FP + FN > 0, "pixel_acc": correct / labelled,
        "mean_acc": mean per-class recall over classes present in the labels, "iou": (K,) per class,
        NaN where the class occurs in neither labels nor predictions}.
    """
    cm = confmat.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = tp / union  # NaN where union = 0
    recall = tp / cm.sum(1)
    total = cm.sum()
    pixel_acc = tp.sum() / total if total > 0 else torch.tensor(float("nan"), dtype=cm.dtype)
    return {"miou": iou.nanmean().float(), "pixel_acc": pixel_acc.float(), "mean_acc": recall.nanmean().float(),
            "iou": iou.float()}


class SegMetrics(Metric):
    """Confusion-matrix mIoU, pixel accuracy and mean class accuracy over a set (mmseg definitions).

    Args:
        num_classes: K.
        ignore_index: label not counted (255).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SegMetrics: num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred: (B, K, H, W) logits or (B, H, W) ids; target: (B, H, W) ids (255 = ignore)."""
        self.confmat += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        return seg_scores(self.confmat)


# ---- referring segmentation ----------------------------------------------------------------


def refseg_stats(pred_mask: Tensor, gt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union of each sample's masks.

    Args:
        pred_mask: (B, H, W) (or (H, W)) bool / {0, 1} predicted mask, or (B, 2, H, W) logits
            (argmax is taken).
        gt_mask: same (B, H, W), bool / {0, 1}.

    Returns:
        (I, U): (B,) int64 pixel counts.
    """
    if pred_mask.is_floating_point() and pred_mask.ndim == 4:
        pred_mask = pred_mask.argmax(dim=1)
    if pred_mask.ndim == 2 and gt_mask.ndim == 2:  # one sample
        pred_mask, gt_mask = pred_mask[None], gt_mask[None]
    if pred_mask.shape != gt_mask.shape or pred_mask.ndim != 3:
        raise ValueError(f"pred_mask {tuple(pred_mask.shape)} and gt_mask {tuple(gt_mask.shape)} must both be "
                         "(B, H, W) masks (or pred_mask (B, 2, H, W) logits)")
    p, g = pred_mask.bool().flatten(1), gt_mask.bool().flatten(1)
    return (p & g).sum(dim=1), (p | g).sum(dim=1)


class RefSegMetrics(Metric):
    """Overall IoU, mean IoU and precision@k of referring segmentation over a set (LAVT definitions).

    Args:
        thresholds: IoU thresholds of precision@k (LAVT: 0.5, 0.6, 0.7, 0.8, 0.9).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, thresholds: tuple[float, ...] = REFSEG_THRESHOLDS) -> None:
        super().__init__()
        self.thresholds = tuple(float(t) for t in thresholds)
        self.add_state("cum_i", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("cum_u", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.zeros(len(self.thresholds), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_mask: Tensor, gt_mask: Tensor) -> None:
        """pred_mask: (B, H, W) mask or (B, 2, H, W) logits; gt_mask: (B, H, W) in {0, 1}."""
        inter, union = refseg_stats(pred_mask, gt_mask)
        iou = torch.where(union > 0, inter.double() / union.clamp_min(1).double(),
                          torch.zeros_like(inter, dtype=torch.float64))
        thr = torch.tensor(self.thresholds, dtype=torch.float64, device=iou.device)  # VPD compares Python floats
        self.cum_i += inter.sum()
        self.cum_u += union.sum()
        self.iou_sum += iou.sum().to(self.iou_sum)
        self.correct += (iou[:, None] >= thr).sum(dim=0)
        self.total += len(iou)

    def compute(self) -> dict[str, Tensor]:
        """{"oiou", "miou", "prec@0.5", ...} in [0, 1] (NaN before any update)."""
        n = self.total.double()
        out = {"oiou": self.cum_i.double() / self.cum_u.double() if self.cum_u > 0 else torch.tensor(0.0),
               "miou": self.iou_sum / n}
        out.update({f"prec@{t:g}": c.double() / n for t, c in zip(self.thresholds, self.correct, strict=True)})
        return {k: v.float() for k, v in out.items()}  # float64 accumulators, float32 results
