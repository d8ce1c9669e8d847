"""The bundled digits data and model: splits, held-out images, loading through the registry."""

from __future__ import annotations

import pytest
import torch

from diffperc import create_backbone
from diffperc.backbones.registry import bundled_model_path
from diffperc.data import digits


def test_splits_and_format() -> None:
    x, y = digits.load("train")
    xh, yh = digits.load("heldout")
    xa, ya = digits.load("all")
    assert x.shape == (1500, 3, 32, 32) and xh.shape == (297, 3, 32, 32)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(torch.cat([x, xh]), xa)
    assert torch.equal(torch.cat([y, yh]), ya) and set(yh.tolist()) == set(range(10))
    assert digits.caption(7) == "a photo of the digit seven"
    with pytest.raises(ValueError, match="split must be one of"):
        digits.load("test")


def test_bundled_model_loads_offline_and_runs() -> None:
    path = bundled_model_path()
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total < 20 * 2**20, f"bundled model is {total / 2**20:.1f} MB"
    bb = create_backbone("digits", attention=True, timestep=1, add_noise=False)
    assert bb.dtype == torch.float32 and bb.size_multiple == 8
    images, labels = digits.load("heldout")
    out = bb(images[:4], prompts=[digits.caption(int(k)) for k in labels[:4]])
    assert [f.shape[-1] for f in out.features] == [32 // r for r in bb.feature_info.reductions()]
    assert sorted(out.attention) == [4, 8] and out.attention[4].shape == (4, 32, 8, 8)


def test_train_script_default_recipe_is_the_bundled_models() -> None:
    """`python scripts/train_digits.py` with no flags rebuilds the recipe recorded in training.json."""
    import argparse
    import dataclasses
    import json

    from script_helpers import load_script

    td = load_script("train_digits")
    parser = argparse.ArgumentParser()
    td.add_recipe_args(parser)
    recipe = td.recipe_from_args(parser.parse_args([]))
    recorded = json.loads((bundled_model_path() / "training.json").read_text())["recipe"]
    assert dataclasses.asdict(recipe) == recorded
    assert dataclasses.asdict(td.recipe_from_args(parser.parse_args(["--preset", "v2"])))["shift"] == 0
