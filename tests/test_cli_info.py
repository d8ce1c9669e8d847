"""``diffperc info``: every family from the registry; with a model, its layer presets and tap points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffperc.backbones import registry
from diffperc.backbones.registry import create_backbone, list_families
from diffperc.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["diffperc"])


def test_info_without_a_model_lists_every_family_and_preset(capsys) -> None:
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for fam in list_families():
        assert any(line.startswith(f"{fam['family']}: ") for line in text.splitlines()), fam["family"]
        for preset in fam["presets"]:
            assert preset in text
    assert "sd21-cleandift" in text and "sdxl: SDXLBackbone" in text


def test_new_families_appear_without_editing_the_command(monkeypatch, capsys) -> None:
    """A family added to the registry (or only to the loader's model_index table) shows up with its presets."""
    from diffperc.backbones import _loading

    monkeypatch.setattr(registry, "_FAMILIES", registry._FAMILIES + (
        ("toyfam", "ToyBackbone", "ToyPipeline", "a toy family"),))
    monkeypatch.setitem(registry._REGISTRY, "toyfam-small", lambda **kw: None)
    monkeypatch.setitem(registry._REGISTRY, "test_toyfam", lambda **kw: None)
    monkeypatch.setitem(_loading.FAMILIES, "OtherPipeline", ("otherfam", ("transformer",)))
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = lines.index("toyfam: ToyBackbone  [model_index.json: ToyPipeline]")
    assert lines[i + 2] == "  presets: test_toyfam, toyfam-small"
    assert "otherfam: (no backbone class yet)  [model_index.json: OtherPipeline]" in lines


def test_info_with_a_model_lists_its_taps_with_measured_sizes(capsys) -> None:
    assert main(["info", "--model", "test_sd", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    bb = create_backbone("test_sd")
    table = bb.tap_table()
    names = [f.name for f in table]
    assert {"up_blocks.1", "up_blocks.0.resnets.0:input", "mid_block", "vae.encoder.down_blocks.0",
            "vae.decoder.up_blocks.1"} <= set(names)
    for f in table:
        assert f"  {f.name:<44} {f.channels:>8} {f.reduction:>9}" in text
    assert "  dift       up_blocks.1" in text and "cross_q    up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q" \
        in text
    # the table's sizes are those of real features: tap them all and run a 32 px image
    every = create_backbone("test_sd", layers=names)
    feats = every(torch.rand(1, 3, 32, 32)).features
    for f, row in zip(feats, table, strict=True):
        assert f.shape[1] == row.channels and f.shape[-1] == 32 // row.reduction, row.name
    assert main(["info", "test_sd", "--device", "cpu"]) == 0  # positional, as before
    assert "tap points" in capsys.readouterr().out
    assert main(["info", "test_sd", "--model", "test_sd2"]) == 1
    assert "give the model once" in capsys.readouterr().err
    assert main(["info", "--unet-weights", "x.safetensors"]) == 1
    assert "need a model" in capsys.readouterr().err


def test_info_parser_imports_no_torch() -> None:
    code = ("import sys\nfrom diffperc.cli import main\ntry:\n    main(['info', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'lightning')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert "--model-config FOLDER_OR_ID" in res.stdout and "--unet-weights PATH_OR_ID" in res.stdout
