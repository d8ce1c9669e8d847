"""The camouflaged-digits real check: scenes with exact masks, and a short run that must beat the random UNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from script_helpers import load_script

pytest.importorskip("pycocotools")
pytest.importorskip("scipy")


def _script():
    return load_script("camo_digits")


def test_scenes_have_exact_disjoint_masks_and_the_contrast_knob() -> None:
    mod = _script()
    images, targets = mod.camo_scenes(12, "heldout", contrast=0.3, seed=0)
    assert images.shape == (12, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    for t in targets:
        assert t["masks"].dtype == torch.bool and len(t["masks"]) == len(t["labels"]) >= 1
        assert (t["masks"].sum(0) <= 1).all()  # disjoint
        assert (t["masks"].flatten(1).sum(1) >= 20).all()
        assert ((0 <= t["labels"]) & (t["labels"] <= 9)).all()
    # strokes differ from the background by about the contrast (another sample of the same texture)
    diffs, same = [], []
    for c, store in ((0.3, diffs), (0.0, same)):
        imgs, tg = mod.camo_scenes(12, "train", contrast=c, seed=1)
        for im, t in zip(imgs, tg, strict=True):
            fg = t["masks"].any(0)
            store.append(abs(im[:, fg].mean() - im[:, ~fg].mean()).item())
    assert 0.2 < sum(diffs) / len(diffs) < 0.35
    assert sum(same) / len(same) < 0.05  # contrast 0: only texture seams show the digit
    a, _ = mod.camo_scenes(2, "train", 0.3, seed=5)
    b, _ = mod.camo_scenes(2, "train", 0.3, seed=5)
    assert torch.equal(a, b)  # seeded


def test_short_run_trained_features_beat_random_unet(tmp_path: Path) -> None:
    mod = _script()
    out = mod.main(["--contrasts", "0.3", "--sources", "digits", "random_unet", "--train", "128", "--test", "32",
                    "--steps", "200", "--points", "256", "--hidden", "32", "--queries", "6", "--decoder-layers", "3",
                    "--encoder-layers", "1", "--out", str(tmp_path)])
    res = out["results"]
    # seed 0, measured: digits 3.0 AP vs random UNet 0.5 (60 steps learned nothing: 0.0 vs 0.0)
    assert res["digits@0.3"]["ap"] > 1.0 and res["digits@0.3"]["ap"] > 2 * res["random_unet@0.3"]["ap"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["digits@0.3"]["ap"] == res["digits@0.3"]["ap"]
    assert (tmp_path / "examples.png").exists()
