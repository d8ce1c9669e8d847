"""Dense metrics and the SiLog loss against independent numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffperc.losses import silog_loss
from diffperc.metrics import (
    DEPTH_KEYS,
    DepthMetrics,
    RefSegMetrics,
    SegMetrics,
    confusion_matrix,
    depth_metrics,
    eigen_crop_mask,
    refseg_stats,
    seg_scores,
)

# ---- depth ---------------------------------------------------------------------------------


def _np_depth(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """GLPDepth/VPD eval_depth on one image, written out in numpy (float64)."""
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    r = np.maximum(p / g, g / p)
    dl = np.log(p) - np.log(g)
    return {
        "abs_rel": np.mean(np.abs(p - g) / g), "sq_rel": np.mean((p - g) ** 2 / g),
        "rmse": np.sqrt(np.mean((p - g) ** 2)), "rmse_log": np.sqrt(np.mean(dl**2)),
        "log10": np.mean(np.abs(np.log10(p) - np.log10(g))), "silog": np.sqrt(np.mean(dl**2) - 0.5 * np.mean(dl) ** 2),
        "d1": np.mean(r < 1.25), "d2": np.mean(r < 1.25**2), "d3": np.mean(r < 1.25**3),
    }


def _random_depth(b: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 9.0, (b, h, w)).astype(np.float32)
    pred = (gt * rng.uniform(0.7, 1.4, (b, h, w))).astype(np.float32)
    gt[rng.random((b, h, w)) < 0.2] = 0.0  # missing depth
    gt[rng.random((b, h, w)) < 0.05] = 12.0  # beyond max_depth
    return pred, gt


def test_eigen_crop_mask() -> None:
    m = eigen_crop_mask(480, 640)
    assert m.shape == (480, 640) and m.dtype == torch.bool
    ref = np.zeros((480, 640), bool)
    ref[45:471, 41:601] = True
    assert np.array_equal(m.numpy(), ref)
    half = eigen_crop_mask(240, 320)  # other sizes: the same fractions of the image
    rows, cols = half.any(1).nonzero()[:, 0], half.any(0).nonzero()[:, 0]
    assert abs(rows[0].item() - 22.5) <= 1 and abs(rows[-1].item() + 1 - 235.5) <= 1
    assert abs(cols[0].item() - 20.5) <= 1 and abs(cols[-1].item() + 1 - 300.5) <= 1


def test_depth_metrics_match_numpy() -> None:
    pred, gt = _random_depth(3, 24, 32)
    got = depth_metrics(torch.from_numpy(pred)[:, None], torch.from_numpy(gt)[:, None], max_depth=10.0)
    per_image = [_np_depth(pred[i], gt[i], (gt[i] > 1e-3) & (gt[i] < 10.0)) for i in range(3)]
    for k in DEPTH_KEYS:
        assert got[k].item() == pytest.approx(np.mean([d[k] for d in per_image]), rel=1e-5, abs=1e-6), k
    # per image, then averaged: differs from pooling all pixels of the batch
    pooled = _np_depth(pred, gt, (gt > 1e-3) & (gt < 10.0))
    assert got["rmse"].item() != pytest.approx(pooled["rmse"], rel=1e-7)


def test_depth_metrics_eigen_crop_matches_numpy() -> None:
    pred, gt = _random_depth(2, 480, 640, seed=1)
    crop = np.zeros((480, 640), bool)
    crop[45:471, 41:601] = True
    # make the border terrible, so including it would change every metric
    pred[:, ~crop] = 0.01
    got = depth_metrics(torch.from_numpy(pred), torch.from_numpy(gt), crop="eigen")
    per_image = [_np_depth(pred[i], gt[i], (gt[i] > 1e-3) & (gt[i] < 10.0) & crop) for i in range(2)]
    for k in DEPTH_KEYS:
        assert got[k].item() == pytest.approx(np.mean([d[k] for d in per_image]), rel=1e-5, abs=1e-6), k
    assert got["d1"].item() > 0.4  # the bad border is out


def test_depth_metrics_accumulate_and_edge_cases() -> None:
    pred, gt = _random_depth(4, 16, 16, seed=2)
    gt[3] = 0.0  # an image without valid pixels is not counted
    m = DepthMetrics()
    m.update(torch.from_numpy(pred[:2])[:, None], torch.from_numpy(gt[:2])[:, None])
    m.update(torch.from_numpy(pred[2:])[:, None], torch.from_numpy(gt[2:])[:, None])
    got = m.compute()
    per_image = [_np_depth(pred[i], gt[i], (gt[i] > 1e-3) & (gt[i] < 10.0)) for i in range(3)]
    for k in DEPTH_KEYS:
        assert got[k].item() == pytest.approx(np.mean([d[k] for d in per_image]), rel=1e-5, abs=1e-6), k
    # perfect prediction
    t = torch.from_numpy(gt[:1])
    perfect = depth_metrics(torch.where(t > 0, t, torch.ones_like(t)), t)
    assert perfect["rmse"].item() == pytest.approx(0.0, abs=1e-6) and perfect["d1"].item() == 1.0
    # VPD: Inf predictions count as max_depth, NaN as min_depth
    p = torch.tensor([[2.0, float("inf"), float("nan")]])
    g = torch.tensor([[2.0, 5.0, 1.0]])
    want = _np_depth(np.array([2.0, 10.0, 1e-3]), g[0].numpy(), np.ones(3, bool))
    got = depth_metrics(p, g)
    assert got["abs_rel"].item() == pytest.approx(want["abs_rel"], rel=1e-5)
    assert math.isnan(depth_metrics(p, torch.zeros_like(g))["rmse"].item())
    with pytest.raises(ValueError, match="crop must be one of"):
        depth_metrics(p, g, crop="garg")
    with pytest.raises(ValueError, match="same shape"):
        depth_metrics(p, g[:, :2])


# ---- silog ---------------------------------------------------------------------------------


def test_silog_loss_matches_hand_computation() -> None:
    pred = torch.tensor([[[[1.0, 2.0], [4.0, 3.0]]]])
    target = torch.tensor([[[[2.0, 2.0], [0.0, 1.5]]]])  # one missing pixel
    d = np.log([2.0, 2.0, 1.5]) - np.log([1.0, 2.0, 3.0])
    want = math.sqrt(np.mean(d**2) - 0.5 * np.mean(d) ** 2)
    assert silog_loss(pred, target).item() == pytest.approx(want, rel=1e-6)
    assert silog_loss(pred, target, lam=0.0).item() == pytest.approx(math.sqrt(np.mean(d**2)), rel=1e-6)
    mask = torch.tensor([[[[True, False], [False, True]]]])
    d2 = np.log([2.0, 1.5]) - np.log([1.0, 3.0])
    want2 = math.sqrt(np.mean(d2**2) - 0.5 * np.mean(d2) ** 2)
    assert silog_loss(pred, target, mask).item() == pytest.approx(want2, rel=1e-6)
    # scale invariance at lam = 1: a global scale costs nothing
    assert silog_loss(3 * target.clamp_min(0.5), target.clamp_min(0.5), lam=1.0).item() < 1e-3


def test_silog_loss_gradients_and_errors() -> None:
    target = torch.rand(2, 1, 8, 8) * 5 + 0.5
    pred = target.clone().requires_grad_()  # exact prediction: finite gradient thanks to eps
    silog_loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all()
    empty = silog_loss(pred, torch.zeros_like(target))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="same shape"):
        silog_loss(pred, target[..., :4])
    with pytest.raises(ValueError, match="pred must be > 0"):
        silog_loss(torch.zeros_like(target), target)
    with pytest.raises(ValueError, match="NaN or Inf"):
        silog_loss(torch.full_like(target, float("nan")), target)
    with pytest.raises(ValueError, match="valid_mask must be a bool"):
        silog_loss(target, target, torch.ones_like(target))


# ---- semantic segmentation -----------------------------------------------------------------


def _np_seg(pred: np.ndarray, gt: np.ndarray, k: int) -> tuple[float, float]:
    keep = gt != 255
    p, g = pred[keep], gt[keep]
    ious = []
    for c in range(k):
        inter = np.sum((p == c) & (g == c))
        union = np.sum((p == c) | (g == c))
        if union > 0:
            ious.append(inter / union)
    return float(np.mean(ious)), float(np.mean(p == g))


def test_seg_metrics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    k = 5
    gt = rng.integers(0, k - 1, (3, 12, 10))  # class 4 never in labels...
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, k, gt.shape))  # ...but predicted
    pred[pred == 255] = 0
    want_miou, want_acc = _np_seg(pred, gt, k)
    m = SegMetrics(k)
    m.update(torch.from_numpy(pred[:2]), torch.from_numpy(gt[:2]))
    m.update(torch.from_numpy(pred[2:]), torch.from_numpy(gt[2:]))
    got = m.compute()
    assert got["miou"].item() == pytest.approx(want_miou, rel=1e-6)
    assert got["pixel_acc"].item() == pytest.approx(want_acc, rel=1e-6)
    assert got["iou"][4].item() == 0.0  # predicted but absent: IoU 0, counted
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), k).numpy()
    keep = gt != 255
    assert cm.sum() == keep.sum()
    assert cm[1, 2] == np.sum((gt[keep] == 1) & (pred[keep] == 2))  # rows true, columns predicted


def test_seg_metrics_logits_ignore_and_absent_classes() -> None:
    target = torch.tensor([[[0, 0, 255], [1, 1, 255]]])
    logits = torch.zeros(1, 3, 2, 3)
    logits[0, 0, 0] = 1.0  # row 0 -> class 0
    logits[0, 1, 1, :1] = 1.0  # (1, 0) -> class 1; (1, 1) and ignored pixels -> class 0
    s = seg_scores(confusion_matrix(logits, target, 3))
    # class 0: TP 2, FP 1 -> 2/3; class 1: TP 1, FN 1 -> 1/2; class 2 absent everywhere: NaN, excluded
    assert s["miou"].item() == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["pixel_acc"].item() == pytest.approx(3 / 4)
    assert math.isnan(s["iou"][2].item())
    with pytest.raises(ValueError, match=r"class ids \[7\] outside \[0, 3\)"):
        confusion_matrix(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 255]]]), 3)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"logits \(B, 3, H, W\)"):
        confusion_matrix(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 3)


# ---- referring segmentation ----------------------------------------------------------------


def test_refseg_oiou_vs_miou_hand_example() -> None:
    # sample 0: a big object predicted well; sample 1: a tiny object missed
    gt = torch.zeros(2, 10, 10, dtype=torch.long)
    pred = torch.zeros(2, 10, 10, dtype=torch.long)
    gt[0, :8, :10] = 1  # 80 px
    pred[0, :8, :9] = 1  # I 72, U 80 -> 0.9
    gt[1, 0, :2] = 1  # 2 px
    pred[1, 5, :2] = 1  # I 0, U 4 -> 0
    inter, union = refseg_stats(pred, gt)
    assert inter.tolist() == [72, 0] and union.tolist() == [80, 4]
    m = RefSegMetrics()
    m.update(pred, gt)
    got = m.compute()
    assert got["oiou"].item() == pytest.approx(72 / 84)  # sum I / sum U: dominated by the big object
    assert got["miou"].item() == pytest.approx(0.45)  # mean of per-sample IoU
    assert got["prec@0.9"].item() == pytest.approx(0.5)  # IoU 0.9 >= 0.9 counts (LAVT uses >=)


def test_refseg_precision_thresholds() -> None:
    ious = [0.45, 0.5, 0.65, 0.75, 0.85, 0.95, 1.0, 0.0]
    preds, gts = [], []
    for iou in ious:  # a 20-px object, prediction covering round(iou * 20) of it
        g = torch.zeros(4, 5, dtype=torch.long)
        g.view(-1)[:20] = 1
        p = torch.zeros_like(g)
        p.view(-1)[: round(iou * 20)] = 1
        preds.append(p)
        gts.append(g)
    m = RefSegMetrics()
    m.update(torch.stack(preds[:3]), torch.stack(gts[:3]))
    m.update(torch.stack(preds[3:]), torch.stack(gts[3:]))
    got = m.compute()
    for thr in (0.5, 0.6, 0.7, 0.8, 0.9):
        want = np.mean([i >= thr for i in ious])
        assert got[f"prec@{thr:g}"].item() == pytest.approx(want), thr
    assert got["miou"].item() == pytest.approx(np.mean(ious), rel=1e-6)
    # logits are accepted, and an empty prediction of an empty mask has IoU 0 (LAVT: U = 0 -> 0)
    logits = torch.zeros(1, 2, 4, 5)
    logits[0, 1, :2] = 1.0
    assert refseg_stats(logits, gts[0][None])[0].item() == 10
    e = RefSegMetrics()
    e.update(torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long))
    assert e.compute()["miou"].item() == 0.0
    with pytest.raises(ValueError, match="must both be"):
        refseg_stats(torch.zeros(2, 3, 3), torch.zeros(2, 3, 4))
