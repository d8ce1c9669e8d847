"""OVCIS head: Mask2Former matching and losses against independent computations, MSFF / CIN / TVA."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffperc.heads.instance import (
    CamouflagedInstanceNorm,
    MultiScaleFeatureFusion,
    OVCISHead,
    TextVisualAggregation,
    instance_inference,
)
from diffperc.heads.mask2former import (
    SetCriterion,
    hungarian_match,
    importance_points,
    match_cost,
    point_sample,
)


def _np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _np_bce(logit: np.ndarray, target: np.ndarray) -> float:
    p = _np_sigmoid(logit.astype(np.float64))
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def _np_dice(logit: np.ndarray, target: np.ndarray) -> float:
    p = _np_sigmoid(logit.astype(np.float64))
    return float(1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1))


def _np_cost(cls: np.ndarray, masks: np.ndarray, labels: np.ndarray, tmasks: np.ndarray) -> np.ndarray:
    """Mask2Former's matching cost, pair by pair (all pixels)."""
    e = np.exp(cls - cls.max(1, keepdims=True))
    prob = e / e.sum(1, keepdims=True)
    cost = np.zeros((len(cls), len(labels)))
    for q, t in itertools.product(range(len(cls)), range(len(labels))):
        cost[q, t] = (-2 * prob[q, labels[t]] + 5 * _np_bce(masks[q], tmasks[t]) + 5 * _np_dice(masks[q], tmasks[t]))
    return cost


def _case(seed: int, q: int = 4, t: int = 3, k: int = 3, s: int = 6):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(q, k + 1, generator=g) * 2
    masks = torch.randn(q, s, s, generator=g) * 3
    labels = torch.randint(0, k, (t,), generator=g)
    tmasks = (torch.rand(t, s, s, generator=g) > 0.5).float()
    return cls, masks, labels, tmasks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_cost_and_assignment_vs_brute_force(seed: int) -> None:
    cls, masks, labels, tmasks = _case(seed)
    cost = match_cost(cls, masks, labels, tmasks, points=None)
    ref = _np_cost(cls.numpy(), masks.numpy(), labels.numpy(), tmasks.numpy())
    np.testing.assert_allclose(cost.numpy(), ref, rtol=1e-5, atol=1e-5)
    rows, cols = hungarian_match(cost)
    got = ref[rows.numpy(), cols.numpy()].sum()
    best = min(sum(ref[p[j], j] for j in range(ref.shape[1])) for p in itertools.permutations(range(ref.shape[0]),
                                                                                              ref.shape[1]))
    assert got == pytest.approx(best, abs=1e-9)
    assert sorted(cols.tolist()) == list(range(len(labels)))  # every target matched once


def test_hungarian_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(torch.tensor([[float("nan"), 1.0]]))


def test_losses_vs_independent_computation() -> None:
    torch.manual_seed(0)
    b, q, k, s = 2, 4, 3, 6
    layers = 2
    outputs = {"class_logits": [torch.randn(b, q, k + 1) for _ in range(layers)],
               "mask_logits": [torch.randn(b, q, s, s) * 2 for _ in range(layers)]}
    targets = [{"labels": torch.tensor([1, 0]), "masks": (torch.rand(2, s, s) > 0.5).float()},
               {"labels": torch.tensor([2]), "masks": (torch.rand(1, s, s) > 0.4).float()}]
    crit = SetCriterion(num_points=None)
    total, parts = crit(outputs, targets)
    expected_total = 0.0
    for layer in range(layers):
        ce_num, ce_den, bce, dice = 0.0, 0.0, 0.0, 0.0
        for i, t in enumerate(targets):
            cl = outputs["class_logits"][layer][i].numpy().astype(np.float64)
            ml = outputs["mask_logits"][layer][i].numpy()
            cost = _np_cost(cl, ml, t["labels"].numpy(), t["masks"].numpy())
            best = min(itertools.permutations(range(q), len(t["labels"])),
                       key=lambda p, c=cost: sum(c[p[j], j] for j in range(len(p))))
            target_cls = np.full(q, k)
            for j, qi in enumerate(best):
                target_cls[qi] = t["labels"][j]
                bce += _np_bce(ml[qi], t["masks"][j].numpy())
                dice += _np_dice(ml[qi], t["masks"][j].numpy())
            logp = cl - cl.max(1, keepdims=True) - np.log(np.exp(cl - cl.max(1, keepdims=True)).sum(1, keepdims=True))
            w = np.where(target_cls == k, 0.1, 1.0)
            ce_num += float((-logp[np.arange(q), target_cls] * w).sum())
            ce_den += float(w.sum())
        ce = ce_num / ce_den  # weighted CE, mean over the whole batch
        bce, dice = bce / 3, dice / 3  # 3 target masks in the batch
        expected_total += 2 * ce + 5 * bce + 5 * dice
        if layer == layers - 1:
            assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
            assert parts["bce"].item() == pytest.approx(bce, rel=1e-5)
            assert parts["dice"].item() == pytest.approx(dice, rel=1e-5)
    assert total.item() == pytest.approx(expected_total, rel=1e-5)  # deep supervision: every layer counts


def test_point_losses_match_transformers_functions() -> None:
    """The point-sampled BCE / Dice equal transformers' Mask2Former loss functions on the same points."""
    from transformers.models.mask2former.modeling_mask2former import dice_loss, sigmoid_cross_entropy_loss

    torch.manual_seed(1)
    logits = torch.randn(3, 8, 8) * 2
    target = (torch.rand(3, 16, 16) > 0.5).float()
    pts = torch.rand(3, 50, 2)
    pl, tl = point_sample(logits, pts), point_sample(target, pts)
    ours_bce = F.binary_cross_entropy_with_logits(pl, tl, reduction="none").mean(1).sum() / 3
    p = pl.sigmoid()
    ours_dice = (1 - (2 * (p * tl).sum(1) + 1) / (p.sum(1) + tl.sum(1) + 1)).sum() / 3
    assert ours_bce.item() == pytest.approx(sigmoid_cross_entropy_loss(pl, tl, 3).item(), rel=1e-5)
    assert ours_dice.item() == pytest.approx(dice_loss(pl, tl, 3).item(), rel=1e-5)
    # point_sample: corners of pixel centres read exact values (align_corners=False)
    centre = torch.tensor([[[0.5 / 8, 0.5 / 8], [7.5 / 8, 2.5 / 8]]])
    got = point_sample(logits[:1], centre)[0]
    assert torch.allclose(got, torch.stack([logits[0, 0, 0], logits[0, 2, 7]]))


def test_importance_sampling_prefers_uncertain_points() -> None:
    logits = torch.full((1, 40, 40), 10.0)
    logits[:, :, 16:28] = 0.0  # uncertain band: 30 % of the area
    torch.manual_seed(0)
    pts = importance_points(logits, 2000, oversample=3.0, importance=0.75)
    assert pts.shape == (1, 2000, 2) and (pts >= 0).all() and (pts <= 1).all()
    in_band = ((pts[0, :, 0] > 16 / 40) & (pts[0, :, 0] < 28 / 40)).float()
    assert in_band[:1500].mean() > 0.99  # the 75 % importance points all sit in the band
    assert 0.2 < in_band[1500:].mean() < 0.4  # the rest are uniform
    with pytest.raises(ValueError, match="importance"):
        importance_points(logits, 10, importance=1.5)


def test_point_sampled_loss_approximates_dense_loss() -> None:
    torch.manual_seed(0)
    outputs = {"class_logits": [torch.randn(1, 3, 2)], "mask_logits": [torch.randn(1, 3, 16, 16)]}
    targets = [{"labels": torch.tensor([0]), "masks": (torch.rand(1, 64, 64) > 0.5).float()}]
    _, dense = SetCriterion(num_points=None)(outputs, targets)
    _, sampled = SetCriterion(num_points=12544, importance=0.0)(outputs, targets)
    assert sampled["bce"].item() == pytest.approx(dense["bce"].item(), rel=0.05)
    assert sampled["dice"].item() == pytest.approx(dense["dice"].item(), rel=0.05)


def test_empty_targets_give_finite_loss_and_gradients() -> None:
    head = _tiny_head()
    out = head([torch.randn(1, 16, 4, 4), torch.randn(1, 8, 8, 8)], torch.randn(2, 8), torch.randn(8))
    loss, parts = SetCriterion(num_points=64)(out, [{"labels": torch.zeros(0, dtype=torch.long),
                                                      "masks": torch.zeros(0, 32, 32)}])
    loss.backward()
    assert torch.isfinite(loss) and parts["bce"].item() == 0.0


def _tiny_head(**kw) -> OVCISHead:
    torch.manual_seed(0)
    return OVCISHead([16, 8], [8, 4], text_dim=8, hidden_dim=32, mask_dim=32, num_queries=5, decoder_layers=3,
                     encoder_layers=1, num_heads=2, dim_feedforward=64, encoder_feedforward_dim=64, **kw)


def test_head_shapes_backward_and_open_vocabulary() -> None:
    head = _tiny_head()
    feats = [torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8)]
    bg = torch.randn(8)
    for k in (1, 3, 7):  # any number of classes, no class-specific weights
        out = head(feats, torch.randn(k, 8), bg)
        assert len(out["class_logits"]) == 3 == len(out["mask_logits"])
        assert out["class_logits"][-1].shape == (2, 5, k + 1)
        assert out["mask_logits"][-1].shape == (2, 5, 8, 8)
    out["class_logits"][-1].sum().backward()
    assert head.tva.query_proj.weight.grad is not None
    assert head.strides == [4, 8, 16]  # 2 backbone levels + one P6-style level
    with pytest.raises(ValueError, match="class_embeds"):
        head(feats, torch.randn(3, 5), bg)
    with pytest.raises(ValueError, match="feature maps"):
        head(feats[:1], torch.randn(3, 8), bg)


def test_msff_formula() -> None:
    torch.manual_seed(0)
    msff = MultiScaleFeatureFusion([4, 6, 3])
    f = [torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4), torch.randn(1, 3, 2, 2)]
    out = msff(f)
    gate = sum(c(F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False))
               for c, x in zip(msff.convs, f[1:], strict=True))
    assert torch.allclose(out[0], f[0] + f[0] * gate)
    assert out[1] is f[1] and out[2] is f[2]


def test_cin_normalises_each_image_and_starts_as_instance_norm() -> None:
    cin = CamouflagedInstanceNorm(4, 8)
    x = torch.randn(2, 4, 6, 6) * 5 + torch.tensor([1.0, 10.0])[:, None, None, None]
    y = cin(x, torch.randn(8))
    assert torch.allclose(y.mean((2, 3)), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(y.var((2, 3), unbiased=False), torch.ones(2, 4), atol=1e-3)
    nn_init = torch.nn.init
    nn_init.normal_(cin.affine.weight)
    t1, t2 = torch.randn(8), torch.randn(8)
    assert not torch.allclose(cin(x, t1), cin(x, t2))  # the text context moves the affine


def test_tva_mean_normalisation_keeps_a_single_class_distinct() -> None:
    cls, bg = torch.randn(1, 8), torch.randn(8)
    table = TextVisualAggregation.normalise_text(cls, bg)
    assert torch.allclose(table.sum(0), torch.zeros(8), atol=1e-6)
    assert torch.allclose(table[0], (cls[0] - bg) / 2, atol=1e-6)
    tva = TextVisualAggregation(16, 8)
    logits = tva(torch.randn(2, 3, 16), table)
    assert logits.shape == (2, 3, 2)
    assert logits.abs().max() <= math.exp(tva.logit_scale.item()) + 1e-4  # cosine x temperature


def test_instance_inference_scores_and_masks() -> None:
    cl = torch.full((1, 2, 3), -10.0)
    cl[0, 0, 1] = 10.0  # query 0: class 1, confident
    ml = torch.full((1, 2, 4, 4), -5.0)
    ml[0, 0, :2] = 5.0  # top half
    res = instance_inference(cl, ml, (8, 8), max_instances=2)[0]
    assert res["labels"][0].item() == 1
    assert res["masks"][0, :3].all() and not res["masks"][0, 5:].any()
    assert res["scores"][0].item() == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), rel=0.02)
    assert res["scores"][0] > res["scores"][1]
