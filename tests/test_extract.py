"""diffperc extract: per-image noise, --recursive, resize modes + metadata, --prompt-file, streamed safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffperc.cli import main
from diffperc.extract import SafetensorsStream

COMMON = ["--model", "test_sd", "--layers", "up_blocks.1", "--size", "32", "--device", "cpu"]


def _img(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_an_images_features_do_not_depend_on_the_folder(tmp_path):
    """Noise on (default timestep 261): the same image alone and among others, in any batch, gives the same features."""
    _img(tmp_path / "alone" / "x.png", 32, 32, 0)
    for i, name in enumerate(["a.png", "x.png", "z.png"]):
        _img(tmp_path / "many" / name, 32, 32, 0 if name == "x.png" else i + 5)
    assert main(["extract", str(tmp_path / "alone"), *COMMON, "--out", str(tmp_path / "1.safetensors")]) == 0
    assert main(["extract", str(tmp_path / "many"), *COMMON, "--batch-size", "3",
                 "--out", str(tmp_path / "3.safetensors")]) == 0
    alone, many = load_file(tmp_path / "1.safetensors"), load_file(tmp_path / "3.safetensors")
    torch.testing.assert_close(alone["x/up_blocks.1"], many["x/up_blocks.1"], atol=1e-5, rtol=1e-4)
    assert (many["a/up_blocks.1"] - many["x/up_blocks.1"]).abs().max() > 1e-3  # other images differ
    assert main(["extract", str(tmp_path / "alone"), *COMMON, "--seed", "1", "--out", str(tmp_path / "s1.safetensors")]) == 0
    assert (load_file(tmp_path / "s1.safetensors")["x/up_blocks.1"] - alone["x/up_blocks.1"]).abs().max() > 1e-4


def test_recursive_resize_modes_metadata_and_prompt_file(tmp_path, capsys):
    root = tmp_path / "imgs"
    _img(root / "wide.png", 20, 40, 1)
    _img(root / "sub" / "tall.jpg", 40, 20, 2)
    assert main(["extract", str(root), *COMMON, "--out", str(tmp_path / "flat")]) == 0
    assert "1 subfolder(s) (use --recursive)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "flat").rglob("*.safetensors")) == ["wide.safetensors"]
    (tmp_path / "p.txt").write_text("wide.png\ta wide thing\nsub/tall\ta tall thing\n")
    for mode in ("stretch", "crop", "pad"):
        out = tmp_path / f"{mode}.safetensors"
        assert main(["extract", str(root), *COMMON, "-r", "--resize", mode, "--prompt-file", str(tmp_path / "p.txt"),
                     "--out", str(out)]) == 0
        with safe_open(out, "pt") as f:
            meta, keys = f.metadata(), set(f.keys())
        assert keys == {"sub/tall/up_blocks.1", "wide/up_blocks.1"}
        assert meta["resize"] == mode and json.loads(meta["images"]) == ["sub/tall", "wide"]
        assert json.loads(meta["original_sizes"]) == [[40, 20], [20, 40]]
        assert json.loads(meta["prompts"]) == ["a tall thing", "a wide thing"]
    assert main(["extract", str(root), *COMMON, "-r", "--resize", "pad", "--no-add-noise", "--out",
                 str(tmp_path / "pad_same.safetensors"), "--prompt", "a wide thing"]) == 0
    (tmp_path / "bad.txt").write_text("wide.png\tonly one\n")
    assert main(["extract", str(root), *COMMON, "-r", "--prompt-file", str(tmp_path / "bad.txt"),
                 "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "has no prompt for 1 image(s), e.g. sub/tall.jpg" in capsys.readouterr().err


def test_safetensors_stream_matches_save_file(tmp_path):
    tensors = {"a/x": torch.randn(3, 4), "b/y": torch.randn(2).to(torch.bfloat16), "c": torch.zeros(0, 5)}
    stream = SafetensorsStream(tmp_path / "s.safetensors")
    for k, v in tensors.items():
        stream.add(k, v)
    stream.close({"k": "v"})
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"k": "v"})
    got, ref = load_file(tmp_path / "s.safetensors"), load_file(tmp_path / "ref.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    with safe_open(tmp_path / "s.safetensors", "pt") as f:
        assert f.metadata() == {"k": "v"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors", "s.safetensors"]  # no temp left
    with pytest.raises(ValueError, match="already written"):
        s2 = SafetensorsStream(tmp_path / "t.safetensors")
        s2.add("a", torch.ones(1))
        s2.add("a", torch.ones(1))


def test_load_features_reads_one_file_and_a_per_image_folder_alike(tmp_path):
    from diffperc.extract import load_features

    _img(tmp_path / "imgs" / "a.png", 32, 32, 0)
    _img(tmp_path / "imgs" / "sub" / "b.png", 32, 32, 1)
    (tmp_path / "imgs" / "sub" / ".hidden.safetensors").write_bytes(b"")  # a temp file: not an image's features
    args = ["extract", str(tmp_path / "imgs"), *COMMON, "-r", "--layers", "up_blocks.0,up_blocks.1"]
    assert main([*args, "--out", str(tmp_path / "one.safetensors")]) == 0
    assert main([*args, "--out", str(tmp_path / "per")]) == 0
    (tmp_path / "per" / ".x.safetensors").write_bytes(b"partial")
    raw = load_file(tmp_path / "one.safetensors")
    one, per = load_features(tmp_path / "one.safetensors"), load_features(tmp_path / "per")
    assert list(one) == list(per) == ["a", "sub/b"]
    for name in one:
        assert sorted(one[name]) == sorted(per[name]) == ["up_blocks.0", "up_blocks.1"]
        for layer in one[name]:
            assert torch.equal(one[name][layer], raw[f"{name}/{layer}"])
            torch.testing.assert_close(per[name][layer], one[name][layer], atol=1e-5, rtol=1e-4)
    assert list(load_features(tmp_path / "per", names=["sub/b"])) == ["sub/b"]
    with pytest.raises(KeyError, match="no features of sub/c"):
        load_features(tmp_path / "one.safetensors", names=["sub/c"])
    with pytest.raises(FileNotFoundError, match="expected the --out of `diffperc extract`"):
        load_features(tmp_path / "nothing")
