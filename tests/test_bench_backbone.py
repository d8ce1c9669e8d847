"""Smoke tests of benchmarks/bench_backbone.py (toy UNets; the real architectures are only configured)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_backbone

        yield bench_backbone
    finally:
        sys.path.remove(str(BENCH))


def test_sdxl_config_is_sdxl_base(bench) -> None:
    """The --arch sdxl UNet is stable-diffusion-xl-base-1.0's: 2048 = 768 + 1280 cross-attention
    channels, 2816 = 6 time ids x 256 + 1280 pooled, three levels with 1/2/10 transformer layers."""
    cfg = bench.unet_config("sdxl")
    assert cfg["block_out_channels"] == (320, 640, 1280)
    assert cfg["transformer_layers_per_block"] == (1, 2, 10)
    assert cfg["attention_head_dim"] == (5, 10, 20)
    assert cfg["cross_attention_dim"] == sum(bench.SDXL_TEXT) == 2048
    assert cfg["projection_class_embeddings_input_dim"] == 6 * cfg["addition_time_embed_dim"] + bench.SDXL_TEXT[1]
    assert bench.unet_config("sdxl", (1, 2, 2))["transformer_layers_per_block"] == (1, 2, 2)
    assert bench.unet_config("sd15", (1, 2, 2)) is bench.SD15_UNET  # the depth override is SDXL's only


def test_tiny_sdxl_runs_every_row(bench, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_backbone.py", "--arch", "tiny_sdxl", "--sizes", "64", "--reps", "1",
                                      "--no-memory", "--no-compile", "--ensemble-size-px", "64"])
    bench.main()
    out = capsys.readouterr().out
    assert "tiny SDXL-shaped UNet" in out and "early-stop tap up_blocks.0" in out
    for row in (*bench.CONFIGS, "attention capture overhead"):
        assert f"| {row} | 64 |" in out
    assert "UNet calls of [8]" in out and "calls of [1, 1, 1, 1, 1, 1, 1, 1]" in out


def test_sdxl_early_stop_matches_the_full_forward(bench) -> None:
    """The early-stopped SDXL tap (with pooled embeds and time ids) is the full UNet's up_blocks.0 output."""
    unet, make = bench.build("cpu", torch.float32, "tiny_sdxl")
    lat, cond, unet_cond = bench.inputs(unet, 64, "cpu", torch.float32)
    got = {}
    h = unet.up_blocks[0].register_forward_hook(lambda m, a, o: got.setdefault("x", o))
    try:
        with torch.no_grad():
            unet(lat, torch.tensor([261]), **unet_cond)
    finally:
        h.remove()
    bb = make(layers=bench.DIFT_TAP["tiny_sdxl"], add_noise=False)
    with torch.no_grad():
        feats = bb(latents=lat, **cond).features[0]
    torch.testing.assert_close(feats, got["x"])
