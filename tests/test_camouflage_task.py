"""InstanceSegTask: configs smoke-tested, open vocabulary, light checkpoints, predictions on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from camouflage_formats import _write_image, make_cod10k  # noqa: E402

from diffperc.cli import cli_main  # noqa: E402
from diffperc.metrics_instance import decode_rle  # noqa: E402
from diffperc.tasks.instance import InstanceSegTask, predict_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "camouflage").glob("*.yaml"))
TINY_HEAD = dict(hidden_dim=32, mask_dim=32, num_queries=5, decoder_layers=3, encoder_layers=1, num_heads=2,
                 dim_feedforward=64, encoder_feedforward_dim=64, num_points=64)


def _overrides(root: Path, out: Path) -> list[str]:
    head = [f"--model.init_args.{k}={v}" for k, v in TINY_HEAD.items()]
    return ["--model.init_args.backbone=test_sd", *head, f"--model.init_args.output_dir={out / 'pred'}",
            f"--data.init_args.root={root}", "--data.init_args.image_size=32", "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0", "--trainer.accelerator=cpu", "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cis")
    make_cod10k(root)
    return root


def _task(names: list[str], **kw) -> InstanceSegTask:
    torch.manual_seed(0)
    return InstanceSegTask(backbone="test_sd", class_names=names, **TINY_HEAD, **kw).eval()


def test_configs_exist_and_print() -> None:
    assert {c.name for c in CONFIGS} >= {"cod10k_ovcis_sd15.yaml", "nc4k_ovcis_sd15.yaml"}
    for cfg in CONFIGS:
        text = cfg.read_text()
        assert "arXiv 2312.17505" in text and "diffperc " in text and "41.0" in text  # header: paper, baseline, command


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_configs_run_on_test_sd(config: Path, data_root: Path, tmp_path: Path) -> None:
    sub = "fit" if "cod10k" in config.name else "test"
    cli = cli_main([sub, "--config", str(config), *_overrides(data_root, tmp_path)])
    model = cli.model
    assert isinstance(model, InstanceSegTask) and model.class_names == ["foreground"]
    assert model.head.tva.query_proj.in_features == 32
    if sub == "test":
        assert "test/ap" in cli.trainer.callback_metrics and 0 <= model.results["ap"] <= 100


def test_open_vocabulary_rename_and_add_classes_without_retraining() -> None:
    task = _task(["crab", "owl"])
    images = torch.rand(2, 3, 32, 32)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    with torch.no_grad():
        base = task(images)["class_logits"][-1]
        renamed = task(images, ["crab", "snake"])["class_logits"][-1]
        added = task(images, ["crab", "owl", "frog"])["class_logits"][-1]
        swapped = task(images, ["owl", "crab"])["class_logits"][-1]
    assert base.shape[-1] == 3 and added.shape[-1] == 4
    assert not torch.allclose(base, renamed)  # the text changes the classifier
    assert torch.allclose(swapped[..., [1, 0, 2]], base, atol=1e-5)  # classes are only their text
    task.test_class_names = ["crab", "owl", "frog"]
    assert torch.allclose(task(images)["class_logits"][-1], added)
    after = task.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_is_light_and_reloads(tmp_path: Path, data_root: Path) -> None:
    from lightning.pytorch import Trainer

    from diffperc.data.camouflage import CamouflageDataModule

    task = _task(["foreground"])
    dm = CamouflageDataModule(str(data_root), image_size=32, batch_size=2)
    trainer = Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(task, dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("backbone.") for k in state)
    loaded = InstanceSegTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    images = torch.rand(1, 3, 32, 32)
    task.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(images)["mask_logits"][-1], task(images)["mask_logits"][-1], atol=1e-5)


def test_predict_writes_overlays_and_rle_json(tmp_path: Path) -> None:
    task = _task(["crab", "owl"], overlay_threshold=0.0)
    _write_image(tmp_path / "in" / "a.png", 24, 40, 0)
    _write_image(tmp_path / "in" / "sub" / "b.jpg", 40, 24, 1)
    pngs = predict_folder(task, tmp_path / "in", tmp_path / "out", image_size=32, progress=False)
    assert [p.name for p in pngs] == ["a.png", "sub_b.png"]
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size == (40, 24)  # the original size
    rec = json.loads((tmp_path / "out" / "a.json").read_text())
    assert rec["class_names"] == ["crab", "owl"] and (rec["height"], rec["width"]) == (24, 40)
    assert len(rec["instances"]) == 10  # top-k over 5 queries x 2 classes, no threshold
    masks = decode_rle([r["segmentation"] for r in rec["instances"]])
    assert masks.shape == (10, 24, 40)
    scores = [r["score"] for r in rec["instances"]]
    assert all(0 <= s <= 1 for s in scores) and np.all(np.isfinite(scores))


def test_feature_cache_gives_the_same_loss_and_skips_the_backbone(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 2, 32, 32)
    masks[0, 0, 4:14, 4:14], masks[0, 1, 18:30, 10:20], masks[1, 0, 8:24, 8:24], masks[1, 1, 2:6, 20:30] = 1, 1, 1, 1
    batch = {"image": torch.rand(2, 3, 32, 32, generator=g), "labels": [torch.tensor([0, 1]), torch.tensor([1, 0])],
             "masks": list(masks)}
    plain, cached = _task(["crab", "owl"]), _task(["crab", "owl"], feature_cache=str(tmp_path / "fc"))
    calls = []
    cached.backbone.register_forward_hook(lambda *a: calls.append(1))

    def loss(task):
        torch.manual_seed(1)  # the point-sampled mask loss draws random points
        return task.criterion(task(batch["image"], task.class_names), task.targets(batch))[0]

    ref = loss(plain)
    first, second = loss(cached), loss(cached)
    assert len(calls) == 1  # the second step read both images' features from disk
    assert torch.allclose(first, ref, rtol=1e-6) and torch.allclose(second, ref, rtol=1e-6)
    cache = cached.backbone_feature_cache()
    assert cache.hits == 2 and len(list(cache.folder.glob("*.safetensors"))) == 2
    flipped = {**batch, "image": batch["image"].flip(-1)}
    cached(flipped["image"])  # an augmented image is a new entry, not a stale hit
    assert len(calls) == 2 and len(list(cache.folder.glob("*.safetensors"))) == 4
    plain.feature_cache = str(tmp_path / "fc2")
    plain.backbone.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen backbone"):
        plain(batch["image"])
