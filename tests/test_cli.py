"""The diffperc command: help, Lightning subcommands on a YAML, extract, info, demo (all on test_sd, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from diffperc.backbones.registry import create_backbone
from diffperc.cli import cli_main, main

ROOT = Path(__file__).resolve().parents[1]
PROBE_YAML = ROOT / "configs" / "probe" / "digits_probe_digits.yaml"



@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    """LightningCLI warns when it sees pytest's own arguments in sys.argv."""
    monkeypatch.setattr("sys.argv", ["diffperc"])


def test_help_lists_all_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "demo", "extract", "info"):
        assert f"    {cmd} " in text, cmd


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fitt"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_print_config_of_the_probe_yaml(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(PROBE_YAML), "--print_config"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "class_path: diffperc.tasks.probe.ProbeTask" in text
    assert "class_path: diffperc.data.digits.DigitsDataModule" in text and "backbone: digits" in text


def test_fit_yaml_on_test_sd_with_fake_data(tmp_path):
    cli = cli_main(["fit", "--config", str(PROBE_YAML), "--model.backbone=test_sd",
                    "--data=diffperc.data.fake.FakeDataModule", "--data.batch_size=2", "--trainer.fast_dev_run=1",
                    "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert type(cli.model).__name__ == "ProbeTask" and cli.model.hparams["backbone"] == "test_sd"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def _pil_tensor(path: Path, size: int) -> torch.Tensor:
    """Independent of the CLI's reader: PIL bilinear resize, HWC uint8 -> CHW float in [0, 1]."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.tensor(np.array(img), dtype=torch.float32).permute(2, 0, 1) / 255


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (32, 32), "b.jpg": (40, 24), "c.png": (17, 50)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_extract_matches_direct_backbone_and_reports_bad_file(image_dir, tmp_path, capsys):
    out = tmp_path / "feats.safetensors"
    rc = main(["extract", str(image_dir), "--model", "test_sd", "--layers", "vpd", "--timestep", "1",
               "--no-add-noise", "--size", "32", "--batch-size", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0
    assert "broken.png" in err and "skipped 1 unreadable image" in err and "3 of 4 images" in err
    assert "notes.txt" in err  # ignored, but said so
    feats = load_file(out)
    bb = create_backbone("test_sd", layers="vpd", timestep=1, add_noise=False)
    images = torch.stack([_pil_tensor(image_dir / n, 32) for n in ("a.png", "b.jpg", "c.png")])
    with torch.no_grad():
        expected = bb(images).features
    assert len(feats) == 3 * len(bb.layers)
    for i, stem in enumerate("abc"):
        for layer, f in zip(bb.layers, expected, strict=True):
            torch.testing.assert_close(feats[f"{stem}/{layer}"], f[i], atol=1e-5, rtol=1e-4)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["images"]) == ["a", "b", "c"] and json.loads(meta["reductions"]) == [16, 8, 4, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_extract_to_a_folder_and_nothing_readable(image_dir, tmp_path, capsys):
    out = tmp_path / "per_image"
    assert main(["extract", str(image_dir), "--model", "test_sd", "--layers", "up_blocks.1",
                 "--size", "32", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert set(load_file(out / "a.safetensors")) == {"up_blocks.1"}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    assert main(["extract", str(bad), "--model", "test_sd", "--out", str(tmp_path / "f.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "x.jpg" in err and "no image could be read" in err
    assert not (tmp_path / "f.safetensors").exists()
    assert main(["extract", str(tmp_path / "missing"), "--model", "test_sd", "--out", str(out)]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_info_prints_feature_info(capsys):
    assert main(["info", "test_sd"]) == 0
    text = capsys.readouterr().out
    bb = create_backbone("test_sd", layers="vpd")
    for f in bb.feature_info:
        assert any(line.split() == [f.name, str(f.channels), str(f.reduction)] for line in text.splitlines())
    assert "prediction_type=epsilon" in text and "size_multiple: 16" in text
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in text


def test_demo_writes_readable_pngs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "test_sd", "--out", str(out), "--n", "2"]) == 0
    printed = capsys.readouterr().out.split()
    pngs = sorted(out.glob("*.png"))
    assert {str(p) for p in pngs} <= set(printed) and len(pngs) == 4  # features, 2 attention, class word
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.width > 100 and im.height > 50
    assert (out / "README.txt").exists()
