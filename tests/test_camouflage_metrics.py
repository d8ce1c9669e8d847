"""Mask AP via COCOeval on hand-made predictions with known COCO numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from diffperc.metrics_instance import InstanceAP, decode_rle, encode_masks  # noqa: E402


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_rle_round_trip() -> None:
    masks = torch.rand(3, 7, 9) > 0.5
    back = decode_rle(encode_masks(masks))
    assert back.shape == (3, 7, 9) and (back == masks.numpy()).all()


def test_one_hit_one_false_positive_one_miss() -> None:
    """2 GT, TP at score 0.9 then FP at 0.8: precision 1 up to recall 0.5 -> AP = 51 / 101 at every IoU."""
    gt = torch.stack([_box(64, 64, 0, 10, 0, 10), _box(64, 64, 30, 40, 30, 40)])
    pred = torch.stack([gt[0], _box(64, 64, 50, 60, 0, 10)])
    metric = InstanceAP(num_classes=1)
    metric.update({"masks": pred, "labels": torch.tensor([0, 0]), "scores": torch.tensor([0.9, 0.8])},
                  {"masks": gt, "labels": torch.tensor([0, 0])})
    res = metric.compute()
    for k in ("ap", "ap50", "ap75", "aps"):
        assert res[k] == pytest.approx(100 * 51 / 101, abs=1e-6)
    assert math.isnan(res["apm"]) and math.isnan(res["apl"])  # no medium / large objects


def test_partial_overlap_counts_at_low_iou_thresholds_only() -> None:
    """IoU 0.62 is a hit at 0.50, 0.55, 0.60 of the ten thresholds: AP 30, AP50 100, AP75 0."""
    gt = _box(40, 40, 0, 10, 0, 10)[None]  # area 100
    pred = _box(40, 40, 0, 10, 0, 10).clone()
    pred[:, 6:] = False  # 60 pixels inside
    pred[0, 6:8] = True  # 62 pixels, IoU 0.62
    assert pred.sum().item() == 62
    metric = InstanceAP(num_classes=1)
    metric.update({"masks": pred[None], "labels": torch.tensor([0]), "scores": torch.tensor([0.5])},
                  {"masks": gt, "labels": torch.tensor([0])})
    res = metric.compute()
    assert res["ap"] == pytest.approx(30.0, abs=1e-6)
    assert res["ap50"] == pytest.approx(100.0, abs=1e-6)
    assert res["ap75"] == pytest.approx(0.0, abs=1e-6)


def test_two_images_two_classes_average_over_categories() -> None:
    """Class 0 perfect on image 1 (AP 100), class 1 at IoU 0.62 on image 2 (AP 30): mean 65; medium objects."""
    a = _box(128, 128, 10, 50, 10, 50)  # 40x40 = 1600 px: medium
    b = _box(128, 128, 0, 50, 0, 50)  # 2500 px
    b_pred = _box(128, 128, 0, 50, 0, 31)  # 1550 px inside: IoU 0.62
    metric = InstanceAP(num_classes=2)
    metric.update({"masks": a[None], "labels": torch.tensor([0]), "scores": torch.tensor([0.7])},
                  {"masks": a[None], "labels": torch.tensor([0])})
    metric.update({"masks": b_pred[None], "labels": torch.tensor([1]), "scores": torch.tensor([0.7])},
                  {"masks": b[None], "labels": torch.tensor([1])})
    res = metric.compute()
    assert res["ap"] == pytest.approx(65.0, abs=1e-6)
    assert res["ap50"] == pytest.approx(100.0, abs=1e-6)
    assert res["ap75"] == pytest.approx(50.0, abs=1e-6)
    assert res["apm"] == pytest.approx(65.0, abs=1e-6)
    assert math.isnan(res["aps"])
    metric.reset()
    assert math.isnan(metric.compute()["ap"])  # nothing seen


def test_wrong_class_is_no_hit_and_bad_labels_raise() -> None:
    gt = _box(32, 32, 0, 10, 0, 10)[None]
    metric = InstanceAP(num_classes=2)
    metric.update({"masks": gt, "labels": torch.tensor([1]), "scores": torch.tensor([0.9])},
                  {"masks": gt, "labels": torch.tensor([0])})
    assert metric.compute()["ap"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="labels must be in"):
        metric.update({"masks": gt, "labels": torch.tensor([2]), "scores": torch.tensor([0.9])},
                      {"masks": gt, "labels": torch.tensor([0])})
    with pytest.raises(ValueError, match="predicted masks"):
        metric.update({"masks": gt[:, :8], "labels": torch.tensor([0]), "scores": torch.tensor([0.9])},
                      {"masks": gt, "labels": torch.tensor([0])})


def test_no_predictions_gives_zero_ap() -> None:
    metric = InstanceAP(num_classes=1)
    empty = {"masks": torch.zeros(0, 16, 16, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long),
             "scores": torch.zeros(0)}
    metric.update(empty, {"masks": _box(16, 16, 0, 4, 0, 4)[None], "labels": torch.tensor([0])})
    assert metric.compute()["ap"] == 0.0
    assert np.isfinite(metric.compute()["ap50"])
