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


# ---------------------------------------------------------------------------- issue 12: structure, device, recipes
HEAVY = ("torch", "lightning", "diffusers", "transformers", "faiss")
COMMANDS = ("recipes", "demo", "extract", "info", "classify", "correspond", "index", "serve", "predict")


def test_parsers_import_nothing_heavy():
    """`diffperc --help` and every `diffperc X --help` build their parsers without torch or Lightning."""
    import subprocess
    import sys

    code = ("import sys\nfrom diffperc.cli import main\n"
            f"for argv in [['--help']] + [[c, '--help'] for c in {COMMANDS!r}]:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert "--device DEVICE" in res.stdout and "--dtype {float32,float16,bfloat16}" in res.stdout


@pytest.fixture
def seen_dtypes():
    """Output dtypes of every Conv2d / Linear run while the fixture is active (a global forward hook)."""
    seen: set[torch.dtype] = set()

    def hook(module, args, output):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and isinstance(output, torch.Tensor):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


def _bf16_argv(cmd: str, image_dir: Path, tmp_path: Path) -> list[str]:
    a, b = str(image_dir / "a.png"), str(image_dir / "b.jpg")
    return {"demo": ["demo", "--model", "test_sd", "--out", str(tmp_path / "demo"), "--n", "1"],
            "extract": ["extract", str(image_dir), "--model", "test_sd", "--size", "32", "--out",
                        str(tmp_path / "f.safetensors")],
            "info": ["info", "test_sd"],
            "classify": ["classify", a, "--classes", "cat,dog", "--model", "test_sd", "--samples", "2", "--size", "32"],
            "correspond": ["correspond", a, b, "--model", "test_sd", "--size", "32", "--points", "5,6",
                           "--out", str(tmp_path / "m.png")],
            "index": ["index", "build", "--images", str(image_dir), "--out", str(tmp_path / "idx"), "--model", "test_sd",
                      "--image-size", "32"]}[cmd]


@pytest.mark.parametrize("cmd", ["demo", "extract", "info", "classify", "correspond", "index"])
def test_every_command_computes_in_bf16(cmd, image_dir, tmp_path, seen_dtypes, capsys):
    assert main([*_bf16_argv(cmd, image_dir, tmp_path), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert seen_dtypes == {torch.bfloat16}, capsys.readouterr().err


def test_device_errors_name_the_option(monkeypatch, image_dir, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["info", "test_sd", "--device", "cuda"]) == 1
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert main(["info", "test_sd", "--device", "gpu0"]) == 1
    assert "--device 'gpu0' is not a device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "test_sd", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_recipes_list_show_and_fit_by_name(capsys, monkeypatch):
    from diffperc.recipes import config_dir, list_recipes

    yamls = sorted(p.relative_to(ROOT / "configs").with_suffix("").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert list_recipes() == yamls and config_dir().resolve() == (ROOT / "configs").resolve()
    assert main(["recipes", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == yamls and "VPD depth on NYUv2" in out[yamls.index("depth/nyu_vpd_sd15")]
    assert main(["recipes", "show", "nyu_vpd_sd15"]) == 0
    assert capsys.readouterr().out == (ROOT / "configs/depth/nyu_vpd_sd15.yaml").read_text()
    assert main(["recipes", "show", "nyu_vpd_sd51"]) == 1
    assert "unknown recipe 'nyu_vpd_sd51'. Did you mean: nyu_vpd_sd15" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["diffperc", "fit", "--config", "probe/digits_probe_digits", "--print_config"])
    import warnings

    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exc:
        warnings.simplefilter("always")
        main()  # as the console script calls it: arguments from sys.argv
    assert exc.value.code == 0 and "class_path: diffperc.tasks.probe.ProbeTask" in capsys.readouterr().out
    assert not [w for w in caught if "args" in str(w.message) and "command line" in str(w.message)]
    assert main(["fit", "--config", "depth/nyu_vpd_sd1"]) == 1
    assert "Did you mean: depth/nyu_vpd_sd15" in capsys.readouterr().err


# ---------------------------------------------------------------------------- predict on a folder, classify/correspond out
SMALL = {"depth/nyu_vpd_sd15": ['--model.init_args.templates=["a photo of a {}."]', "--model.init_args.neck_channels=16",
                                "--model.init_args.deconv_channels=8", "--model.init_args.num_deconv=1",
                                "--model.init_args.decoder_channels=8"],
         "semseg/ade20k_vpd_sd15": ['--model.init_args.templates=["a photo of a {}."]', "--model.init_args.fpn_channels=8",
                                    "--model.init_args.head_channels=4", "--model.init_args.num_classes=3",
                                    '--model.init_args.class_names=["sky","road","tree"]'],
         "refseg/refcoco_vpd_sd15": ["--model.init_args.max_tokens=8", "--model.init_args.hidden=8"]}


def _checkpoint(recipe: str, path: Path) -> Path:
    """A task checkpoint as `diffperc fit` writes it (LightningCLI hyperparameters with `_class_path`), untrained."""
    import lightning

    cli = cli_main(["--config", recipe, "--model.init_args.backbone=test_sd", *SMALL[recipe],
                    "--data=diffperc.data.fake.FakeDataModule", "--trainer.logger=false"], run=False)
    torch.save({"state_dict": cli.model.state_dict(), "hyper_parameters": dict(cli.model.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


@pytest.mark.parametrize("recipe", list(SMALL))
def test_predict_a_folder_with_a_checkpoint(recipe, tmp_path, capsys, seen_dtypes, monkeypatch):
    images = tmp_path / "mine"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / "sub" / "b.png")
    (images / "broken.png").write_bytes(b"no")
    (tmp_path / "s.txt").write_text("a.jpg\tthe left thing\nsub/b\tthe cat\n")
    ckpt = _checkpoint(recipe, tmp_path / "task.ckpt")
    import diffperc.predict

    real_load = diffperc.predict.load_task

    def load_then_forget(*args, **kwargs):  # building the task probes its backbone once in fp32, before the cast
        loaded = real_load(*args, **kwargs)
        seen_dtypes.clear()
        return loaded

    monkeypatch.setattr(diffperc.predict, "load_task", load_then_forget)
    out = tmp_path / "pred"
    assert main(["predict", str(images), "--ckpt_path", str(ckpt), "--out", str(out), "--recursive", "--device", "cpu",
                 "--dtype", "bfloat16", "--sentences", str(tmp_path / "s.txt")]) == 0
    assert seen_dtypes == {torch.bfloat16}
    assert "skipped 1 image(s)" in capsys.readouterr().err and "broken.png" not in {p.name for p in out.rglob("*")}
    raw = {"depth": "_depth_mm", "semseg": "_labels", "refseg": "_mask"}[recipe.split("/")[0]]
    for rel, hw in (("a", (40, 56)), ("sub/b", (32, 32))):
        with Image.open(out / f"{rel}{raw}.png") as im:
            assert im.size == hw[::-1]
            values = np.asarray(im)
        with Image.open(out / f"{rel}.png") as im:
            im.load()
        if raw == "_depth_mm":
            assert values.dtype == np.uint16 and 0 < values.max() <= 10000
        elif raw == "_labels":
            assert values.max() < 3
        else:
            assert set(np.unique(values)) <= {0, 255}


def test_classify_and_correspond_folders_write_json_and_csv(image_dir, tmp_path, capsys):
    out = tmp_path / "labels.json"
    assert main(["classify", str(image_dir), "--classes", "cat,dog", "--model", "test_sd", "--samples", "2",
                 "--size", "32", "--out", str(out), "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())
    assert [r["image"] for r in rows] == ["a.png", "b.jpg", "c.png"]
    assert all(r["pred"] == r["ranking"][0] and set(r["errors"]) == {"cat", "dog"} for r in rows)
    assert "skipped 1 unreadable: broken.png" in capsys.readouterr().err
    csv_out = tmp_path / "m.csv"
    assert main(["correspond", str(image_dir / "a.png"), str(image_dir), "--model", "test_sd", "--size", "32",
                 "--points", "5,6;10,12", "--out", str(csv_out), "--device", "cpu"]) == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "target,point,src_x,src_y,trg_x,trg_y,mutual" and len(lines) == 1 + 3 * 2
    pics = tmp_path / "pics"
    assert main(["correspond", str(image_dir / "a.png"), str(image_dir), "--model", "test_sd", "--size", "32",
                 "--points", "5,6", "--out", str(pics), "--device", "cpu"]) == 0
    assert sorted(p.name for p in pics.iterdir()) == ["a.png", "b.png", "c.png", "matches.json"]


def test_index_add_query_and_serve_compute_in_bf16(image_dir, tmp_path, seen_dtypes, monkeypatch, capsys):
    """An index built in fp32 opens in bf16 (the fingerprint is of the weights as loaded) and embeds in bf16."""
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    idx = str(tmp_path / "idx")
    assert main(["index", "build", "--images", str(image_dir), "--out", idx, "--model", "test_sd", "--image-size", "32",
                 "--device", "cpu"]) == 0
    bf16 = ["--device", "cpu", "--dtype", "bfloat16"]
    more = tmp_path / "more"
    more.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(more / "d.png")
    seen_dtypes.clear()
    assert main(["index", "add", "--index", idx, "--images", str(more), *bf16]) == 0
    assert main(["index", "query", "--index", idx, str(image_dir / "a.png"), "--json", *bf16]) == 0
    assert seen_dtypes == {torch.bfloat16}
    out = capsys.readouterr().out
    assert json.loads(out[out.index("["):])[0]["id"] == "a"
    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: apps.append(app))
    assert main(["serve", "--index", idx, *bf16]) == 0
    seen_dtypes.clear()
    with TestClient(apps[0]) as client:
        r = client.post("/v1/search", files={"image": ("q.png", (image_dir / "a.png").read_bytes(), "image/png")},
                        data={"k": "2"})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "a"
    assert seen_dtypes == {torch.bfloat16}


# ---------------------------------------------------------------------------- --model-config / --unet-weights
MODEL_COMMANDS = {"demo": [], "extract": ["imgs", "--out", "o.safetensors"], "info": [],
                  "classify": ["a.png", "--classes", "a,b"], "correspond": ["a.png", "b.png", "--out", "m.png"]}


@pytest.mark.parametrize("cmd", sorted(MODEL_COMMANDS))
def test_every_model_command_takes_model_config_and_unet_weights(cmd):
    """Whatever the order, --model carries both to the loader (ModelArg.load_kwargs)."""
    from diffperc.cli import build_parser

    parser = build_parser()
    rest = MODEL_COMMANDS[cmd]
    for argv in ([cmd, *rest, "--model-config", "cfg", "--model", "m.ckpt", "--unet-weights", "u.safetensors"],
                 [cmd, *rest, "--unet-weights", "u.safetensors", "--model-config", "cfg", "--model", "m.ckpt"]):
        args = parser.parse_args(argv)
        assert str(args.model) == "m.ckpt"
        assert args.model.load_kwargs == {"config": "cfg", "unet_weights": "u.safetensors"}
    if cmd != "info":  # a default model gets them too
        args = parser.parse_args([cmd, *rest, "--unet-weights", "u.safetensors"])
        assert args.model.load_kwargs == {"unet_weights": "u.safetensors"}


def test_single_file_model_with_model_config(tmp_path, image_dir, monkeypatch, capsys):
    """A tiny original-format checkpoint: --model-config FOLDER loads it offline; without it the error says so."""
    from safetensors.torch import save_file
    from test_backbones_loading import _sd1_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = create_backbone("test_sd", layers="dift", timestep=1, add_noise=False)
    bb.save_pretrained(tmp_path / "cfg")
    ckpt = tmp_path / "tiny.safetensors"
    save_file(_sd1_single_file(bb), ckpt)
    assert main(["extract", str(image_dir), "--model", str(ckpt), "--model-config", str(tmp_path / "cfg"),
                 "--layers", "dift", "--timestep", "1", "--no-add-noise", "--size", "32", "--device", "cpu",
                 "--out", str(tmp_path / "f.safetensors")]) == 0
    got = load_file(tmp_path / "f.safetensors")["a/up_blocks.1"]
    assert main(["extract", str(image_dir), "--model", str(tmp_path / "cfg"), "--layers", "dift", "--timestep", "1",
                 "--no-add-noise", "--size", "32", "--device", "cpu", "--out", str(tmp_path / "g.safetensors")]) == 0
    torch.testing.assert_close(got, load_file(tmp_path / "g.safetensors")["a/up_blocks.1"], rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(["info", "--model", str(ckpt), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "--model-config" in err and "local diffusers folder" in err
    assert main(["info", "--model", "test_sd", "--model-config", str(tmp_path / "cfg")]) == 1
    assert "only for a single-file checkpoint" in capsys.readouterr().err


def test_extract_with_unet_weights_uses_that_unet(tmp_path, image_dir):
    from safetensors.torch import save_file

    from diffperc.backbones.tiny import tiny_sd_components

    save_file(tiny_sd_components(seed=3)["unet"].state_dict(), tmp_path / "u.safetensors")
    outs = {}
    for name, extra in (("plain", []), ("override", ["--unet-weights", str(tmp_path / "u.safetensors")])):
        assert main(["extract", str(image_dir), "--model", "test_sd", *extra, "--layers", "dift", "--size", "32",
                     "--device", "cpu", "--out", str(tmp_path / f"{name}.safetensors")]) == 0
        outs[name] = load_file(tmp_path / f"{name}.safetensors")["a/up_blocks.1"]
    assert not torch.allclose(outs["plain"], outs["override"])
    ref_dir = tmp_path / "ref"
    create_backbone("test_sd", seed=3).unet.save_pretrained(ref_dir)  # the same UNet as a folder
    assert main(["extract", str(image_dir), "--model", "test_sd", "--unet-weights", str(ref_dir), "--layers", "dift",
                 "--size", "32", "--device", "cpu", "--out", str(tmp_path / "folder.safetensors")]) == 0
    torch.testing.assert_close(load_file(tmp_path / "folder.safetensors")["a/up_blocks.1"], outs["override"],
                               rtol=0, atol=0)
