"""CompositionalityTask through `diffperc test -c` on every configs/compositionality YAML, and Self-Bench generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from compositionality_formats import make_clevr, make_selfbench, make_sugarcrepe, make_vg, make_winoground

from diffperc.cli import cli_main
from diffperc.data.compositional import load_selfbench
from diffperc.zeroshot.compositional import ErrorBank, task_metrics
from diffperc.zeroshot.compositional_selfbench import generate_selfbench, geneval_metadata, geneval_prompts

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "compositionality").glob("*.yaml"))
FLOW = {"sd3m"}
MAKERS = {"winoground": make_winoground, "vg_relation": make_vg, "clevr": make_clevr,
          "sugarcrepe": lambda r: make_sugarcrepe(r, "swap_att"),
          "selfbench": lambda r: make_selfbench(r / "outputs") and r / "outputs"}


def test_every_config_has_a_maker():
    assert CONFIGS and {yaml.safe_load(c.read_text())["data"]["init_args"]["task"] for c in CONFIGS} <= set(MAKERS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_on_tiny_model(config, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    assert "Published numbers" in config.read_text() and "diffperc test --config" in config.read_text()
    task = cfg["data"]["init_args"]["task"]
    root = MAKERS[task](tmp_path / task)
    tiny = "test_sd3" if cfg["model"]["init_args"]["backbone"] in FLOW else "test_sd"
    out = tmp_path / "out"
    args = ["test", "--config", str(config), f"--model.init_args.backbone={tiny}", f"--model.init_args.output_dir={out}",
            f"--data.init_args.root={root}", "--data.init_args.image_size=16", "--data.init_args.limit=2",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu"]
    if task == "sugarcrepe":
        args.append(f"--data.init_args.loader_kwargs={{image_root: {root / 'val2017'}}}")
    cli = cli_main(args)
    sub = cfg["data"]["init_args"]["subtask"]
    name = f"{task}_{sub}" if sub else task
    bank = ErrorBank.load(out / f"{name}_errors.pt")
    assert len(bank) == 2 and bank.timesteps.shape == (30,)
    assert bank.errors[0].shape[-1] == 30 and torch.isfinite(bank.errors[0]).all()
    md = (out / f"{name}_table.md").read_text()
    csv = (out / f"{name}_table.csv").read_text()
    metrics = task_metrics(bank)
    key = "group" if task == "winoground" else "acc"
    assert f"{metrics['all'][key]:.2f}" in md and csv.startswith("task,subtask")
    assert cli.model.results[name]["all"][key] == metrics["all"][key]


def test_learned_weights_applied_in_the_task(tmp_path):
    root = make_clevr(tmp_path / "clevr")
    w = torch.zeros(30)
    w[3] = 1.0
    torch.save(w, tmp_path / "w.pt")
    out = tmp_path / "out"
    cli = cli_main(["test", "--model=diffperc.tasks.compositionality.CompositionalityTask",
                    "--model.init_args.backbone=test_sd", f"--model.init_args.timestep_weights={tmp_path / 'w.pt'}",
                    f"--model.init_args.output_dir={out}", "--data=diffperc.data.compositional.CompositionalDataModule",
                    "--data.init_args.task=clevr", f"--data.init_args.root={root}", "--data.init_args.image_size=16",
                    "--data.init_args.limit=3", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    bank = ErrorBank.load(out / "clevr_errors.pt")
    assert cli.model.results["clevr+weights"] == task_metrics(bank, w)
    assert "clevr+weights" in (out / "clevr_table.md").read_text()
    torch.save(torch.ones(7), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"must hold a \(30,\) weight tensor"):
        from diffperc.tasks.compositionality import CompositionalityTask

        CompositionalityTask("test_sd", timestep_weights=str(tmp_path / "bad.pt"))


def test_selfbench_generation_is_seeded_cached_and_loadable(tmp_path, monkeypatch):
    from diffperc import create_backbone
    from diffperc.zeroshot import compositional_selfbench as sb

    bb = create_backbone("test_sd")
    classes = ["car", "dog"]
    meta = geneval_metadata("colors", classes, 2, seed=1)
    assert all(m["prompt"] in geneval_prompts(classes)["colors"][m["include"][0]["class"]] for m in meta)
    kw = dict(candidates=geneval_prompts(classes), n_samples=2, num_inference_steps=2, image_size=16, progress=False)
    folder = generate_selfbench(bb, meta, tmp_path / "a", "test_sd", **kw)
    assert folder == tmp_path / "a" / "9.0" / "test_sd"
    items = load_selfbench(tmp_path / "a", subtask="colors", model="test_sd")
    assert len(items) == 4 and all(it.captions[it.label] == meta[int(it.id[:5])]["prompt"] for it in items)
    again = generate_selfbench(bb, meta, tmp_path / "b", "test_sd", **kw)
    png = "00001/samples/00001.png"
    assert (folder / png).read_bytes() == (again / png).read_bytes()  # seeded
    assert (folder / png).read_bytes() != (folder / "00001/samples/00000.png").read_bytes()
    monkeypatch.setattr(sb, "build_pipeline", lambda *a, **k: pytest.fail("cached prompts must not regenerate"))
    generate_selfbench(bb, meta, tmp_path / "a", "test_sd", **kw)
    with pytest.raises(ValueError, match="needs at least two classes"):
        geneval_metadata("position", ["car"], 1)


def test_selfbench_generation_with_flow_model(tmp_path):
    from diffperc.zeroshot.flow import tiny_flow_model

    model = tiny_flow_model()
    meta = geneval_metadata("position", ["car", "dog"], 1)
    folder = generate_selfbench(model, meta, tmp_path, "test_sd3", geneval_prompts(["car", "dog"]), n_samples=1,
                                num_inference_steps=2, image_size=16, progress=False)
    item = load_selfbench(tmp_path, subtask="position", model="test_sd3")[0]
    assert item.captions[item.label] == meta[0]["prompt"] and (folder / "00000/samples/00000.png").is_file()


def test_item_errors_sd_matches_classifier_and_warns_on_long_captions():
    from diffperc import create_backbone
    from diffperc.zeroshot.classifier import DiffusionClassifier
    from diffperc.zeroshot.compositional import item_errors
    from diffperc.zeroshot.flow import RELEASED_START_SD, released_grid

    bb = create_backbone("test_sd")
    images = torch.rand(2, 3, 16, 16)
    long = "a photo of " + " and ".join(["a red cube"] * 30)
    with pytest.warns(UserWarning, match="1 of 2 captions tokenize to more than"):
        err, unc, pos = item_errors(bb, images, [long, "a dog"], normalize=True)
    assert err.shape == (2, 2, 30) and unc.shape == (2, 30)
    assert pos.tolist() == list(range(32, 990, 33)) == released_grid(30, 1000, RELEASED_START_SD).tolist()
    ref = DiffusionClassifier(bb, [long, "a dog", ""], schedule=[(30, 1)], loss="l2_norm").pair_errors(images,
                                                                                                        timesteps=pos)
    torch.testing.assert_close(err, ref[:, :2].permute(1, 0, 2))
    torch.testing.assert_close(unc, ref[:, 2])
    with pytest.raises(ValueError, match="captions must be distinct"):
        item_errors(bb, images, ["a dog", "a dog"])
    with pytest.raises(ValueError, match="SD3 flow-matching loss weighting"):
        item_errors(bb, images, ["a dog", "a cat"], weighting="cosmap")
