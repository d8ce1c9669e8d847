"""viz.py: PNGs written atomically with the expected sizes; PCA pictures show known structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffperc import viz


def test_save_png_roundtrip_and_atomic(tmp_path):
    img = viz.to_pil(torch.rand(3, 20, 30))
    path = viz.save_png(img, tmp_path / "sub" / "x.png")
    with Image.open(path) as back:
        assert back.size == (30, 20) and back.mode == "RGB"
        assert np.array_equal(np.asarray(back), np.asarray(img))
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left behind


def test_feature_pca_of_a_ramp_follows_x():
    h, w = 8, 16
    x = torch.linspace(-1, 1, w).expand(h, w)
    feat = torch.stack([5 * x, 0.01 * torch.randn(h, w), 0.01 * torch.randn(h, w), 0.01 * torch.randn(h, w)])
    rgb = np.asarray(viz.feature_pca_image(feat, size=(w * 4, h * 4)), dtype=float)  # (4h, 4w, 3)
    red = rgb[..., 0]
    cols = red.mean(0)
    assert np.all(np.diff(cols[::4]) >= 0) and cols[-1] - cols[0] > 200  # first component = x, increasing
    assert red.std(0).max() < 1e-6  # and constant down each column


def test_feature_pca_separates_two_regions():
    feat = torch.zeros(6, 10, 10)
    feat[:, :, :5] = torch.randn(6, 1, 1)
    feat[:, :, 5:] = torch.randn(6, 1, 1)
    rgb = viz.feature_pca(feat)[0]  # (3, 10, 10)
    left, right = rgb[:, :, :5].flatten(1), rgb[:, :, 5:].flatten(1)
    assert left.std(1).max() < 1e-6 and right.std(1).max() < 1e-6
    assert (left[:, 0] - right[:, 0]).abs().max() > 0.5


def test_feature_pca_batch_and_validation():
    out = viz.feature_pca(torch.randn(3, 2, 4, 5))  # fewer channels than components
    assert out.shape == (3, 3, 4, 5) and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out[:, 2], torch.full_like(out[:, 2], 0.5))  # missing component = grey
    with pytest.raises(ValueError, match="features must be"):
        viz.feature_pca(torch.randn(4, 5))


def test_attention_grid_size_and_hot_spot():
    maps = torch.full((3, 4, 4), 0.01)
    maps[1, 0, 0] = 0.9  # token 1 looks at the top-left corner
    size, pad = 96, 4  # panels wider than their labels
    grid = viz.attention_grid(torch.rand(3, 32, 32), maps, ["<start>", "cat", "<end>"], size=size, alpha=1.0)
    assert grid.width == 4 * (size + pad) + pad and grid.height > size  # input + 3 panels, labels below
    panel = np.asarray(grid, dtype=float)[pad : pad + size, pad + 2 * (size + pad) : pad + 2 * (size + pad) + size]
    assert panel[2, 2].sum() > 600 and panel[-3, -3].sum() < 60  # bright yellow corner, dark elsewhere
    with pytest.raises(ValueError, match="one token per map"):
        viz.attention_grid(torch.rand(3, 32, 32), maps, ["a", "b"])


def test_image_grid_layout():
    tiles = [torch.rand(3, 10, 12) for _ in range(5)]
    grid = viz.image_grid(tiles, nrow=2, pad=2)
    assert grid.size == (2 * 12 + 3 * 2, 3 * 10 + 4 * 2)
    labelled = viz.image_grid(tiles, nrow=5, labels=[f"t{i}" for i in range(5)], pad=2)
    assert labelled.height > 10 + 4
    with pytest.raises(ValueError, match="labels"):
        viz.image_grid(tiles, nrow=2, labels=["a"])
