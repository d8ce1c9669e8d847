"""VPD dense tasks (depth, semantic and referring segmentation) through the real CLI on test_sd and tiny on-disk
datasets; TTA, sliding windows, prompts, schedules and pictures against independent computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dense_formats import make_ade20k, make_nyu, make_refcoco
from PIL import Image

from diffperc import viz
from diffperc.cli import cli_main
from diffperc.metrics import depth_metrics
from diffperc.tasks._schedules import lr_factor, poly_factor, vpd_depth_factor
from diffperc.tasks._text import class_embeddings, encode_sentences
from diffperc.tasks.depth import DepthTask, _AutoCropDepthMetrics
from diffperc.tasks.semseg import SemSegTask, slide_windows

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for d in ("depth", "semseg", "refseg")
                 for p in (ROOT / "configs" / d).glob("*.yaml"))
BB = {"layers": "vpd", "timestep": 1, "add_noise": False}
ATTN = {**BB, "attention": True, "attention_resolutions": [16, 32]}
ONE_TEMPLATE = '--model.init_args.templates=["a photo of a {}."]'


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["diffperc"])  # LightningCLI warns about pytest's own arguments


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dense")
    return {"nyu": make_nyu(base / "nyu"), "ade": make_ade20k(base / "ade"), "ref": make_refcoco(base / "ref")}


def _overrides(config: str, roots: dict[str, Path]) -> list[str]:
    """test_sd, small heads and the tiny copy of the config's dataset."""
    common = ["--model.init_args.backbone=test_sd", "--trainer.accelerator=cpu", "--data.init_args.num_workers=0",
              "--data.init_args.batch_size=2"]
    if "nyu" in config:
        return common + [ONE_TEMPLATE, "--model.init_args.neck_channels=16", "--model.init_args.deconv_channels=8",
                         "--model.init_args.num_deconv=1",
                         "--model.init_args.decoder_channels=8", f"--data.init_args.root={roots['nyu']}",
                         "--data.init_args.crop_size=32"]
    if "synthetic" in config:
        return common + ["--model.init_args.neck_channels=16", "--data.init_args.num_train=4",
                         "--data.init_args.num_val=2", "--trainer.logger=false"]
    if "ade20k" in config:
        return common + [ONE_TEMPLATE, "--model.init_args.fpn_channels=8", "--model.init_args.head_channels=4",
                         "--model.init_args.slide_crop=32", "--model.init_args.slide_stride=21",
                         f"--data.init_args.root={roots['ade']}", "--data.init_args.crop_size=32",
                         "--data.init_args.scale=null"]
    if "refcoco" in config:
        return common + ["--model.init_args.max_tokens=8", "--model.init_args.hidden=8",
                         f"--data.init_args.root={roots['ref']}", "--data.init_args.image_size=32"]
    raise AssertionError(f"no test overrides for {config}")


# ---------------------------------------------------------------- configs through the CLI
@pytest.mark.parametrize("config", CONFIGS)
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(ROOT / config), "--print_config"])
    assert exc.value.code == 0
    assert "class_path: diffperc.tasks." in capsys.readouterr().out


@pytest.mark.parametrize("config", CONFIGS)
def test_config_fit_validate_test_predict(config, roots, tmp_path):
    args = ["--config", str(ROOT / config), *_overrides(config, roots), "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={tmp_path}", f"--model.init_args.output_dir={tmp_path / 'pred'}"]
    fit = cli_main(["fit", *args])
    assert fit.trainer.global_step == 1 and torch.isfinite(fit.trainer.callback_metrics["train/loss"])
    model = fit.model
    assert model.hparams["backbone"] == "test_sd"
    stage_keys = {"DepthTask": "abs_rel", "SemSegTask": "miou", "RefSegTask": "oiou"}[type(model).__name__]
    for cmd in ("validate", "test"):
        cli = cli_main([cmd, *args])
        value = cli.trainer.callback_metrics[f"{'val' if cmd == 'validate' else 'test'}/{stage_keys}"]
        assert torch.isfinite(value)
    pred = cli_main(["predict", *args])
    outputs = pred.trainer.predict_loop.predictions
    assert outputs and all(isinstance(v, torch.Tensor) for v in outputs[0].values())
    pngs = sorted((tmp_path / "pred").glob("*.png"))
    assert pngs and not list((tmp_path / "pred").glob("*.tmp"))
    for png in pngs:
        with Image.open(png) as im:
            im.load()
            assert im.width >= 32 and im.height >= 32


def test_checkpoint_is_light_and_resumes(roots, tmp_path):
    config = "configs/depth/nyu_vpd_sd15.yaml"
    args = ["--config", str(ROOT / config), *_overrides(config, roots), "--trainer.logger=false",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    first = cli_main(["fit", *args, "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path / 'a'}"])
    (ckpt,) = (tmp_path / "a" / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    keys = set(state["state_dict"])
    assert not any(k.startswith(("backbone.vae.", "backbone.text_encoder.")) for k in keys)  # frozen: left out
    assert any(k.startswith("backbone.unet.") for k in keys)  # trainable: kept (VPD fine-tunes the UNet)
    assert any(k.startswith("head.") for k in keys) and "adapter.gamma" in keys
    hp = state["hyper_parameters"]
    assert hp["backbone"] == "test_sd" and hp["backbone_kwargs"]["trainable"] is True
    assert len(hp["scene_names"]) == 27  # from the datamodule, saved for loading
    second = cli_main(["fit", *args, "--trainer.max_steps=4", f"--trainer.default_root_dir={tmp_path / 'b'}",
                       f"--ckpt_path={ckpt}"])
    assert second.trainer.global_step == 4
    # the resumed run started from the saved weights: the loaded head equals the checkpoint's before training
    loaded = DepthTask.load_from_checkpoint(ckpt, map_location="cpu")
    torch.testing.assert_close(loaded.head.last[-1].weight, state["state_dict"]["head.last.2.weight"])
    torch.testing.assert_close(loaded.adapter.gamma, first.model.adapter.gamma.detach())


# ---------------------------------------------------------------- tasks vs hand computations
@pytest.fixture(scope="module")
def depth_task() -> DepthTask:
    torch.manual_seed(0)
    task = DepthTask(backbone="test_sd", backbone_kwargs=BB, neck_channels=16, deconv_channels=8, decoder_channels=8,
                     scene_names=["living_room", "kitchen"], templates=["a photo of a {}."], shift_windows=2)
    return task.eval()


def test_depth_tta_matches_hand_computation(depth_task):
    torch.manual_seed(1)

    def flip_avg(img: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        return (depth_task(img, scene) + depth_task(img.flip(-1), scene).flip(-1)) / 2

    x, scene = torch.rand(2, 3, 32, 64), torch.tensor([1, 0])
    x3, scene3 = torch.rand(1, 3, 32, 48), torch.tensor([1])
    with torch.no_grad():
        # 2 windows of 32 x 32 over 32 x 64: at x = 0 and 32, no overlap
        expected = torch.cat([flip_avg(x[..., :32], scene), flip_avg(x[..., 32:], scene)], dim=-1)
        got = depth_task.predict_depth(x, scene)
        # over 32 x 48: at x = 0 and 16, averaged on columns 16:32
        a, b = flip_avg(x3[..., :32], scene3), flip_avg(x3[..., 16:], scene3)
        got3 = depth_task.predict_depth(x3, scene3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got3[..., :16], a[..., :16], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got3[..., 16:32], (a[..., 16:] + b[..., :16]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got3[..., 32:], b[..., 16:], atol=1e-5, rtol=1e-5)
    assert got.min() > 0 and got.max() < 10


def test_depth_scene_prompt_is_the_adapted_scene_embedding(depth_task):
    bb = depth_task.backbone
    ids = bb.tokenizer(["a photo of a living room."], padding="max_length", max_length=20, truncation=True,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = bb.text_encoder(input_ids=ids).pooler_output[0]
        prompts = depth_task.scene_prompts(torch.tensor([0, 0]), 2)
    torch.testing.assert_close(prompts[0, 0], depth_task.adapter(pooled), atol=1e-6, rtol=1e-5)
    assert prompts.shape == (2, 1, bb.unet.config.cross_attention_dim)
    with pytest.raises(ValueError, match="scene"):
        depth_task.scene_prompts(torch.tensor([2]), 1)


def test_depth_metrics_crop_auto_is_eigen_on_nyu_size():
    torch.manual_seed(0)
    pred, gt = torch.rand(1, 1, 480, 640) * 9 + 0.5, torch.rand(1, 1, 480, 640) * 9 + 0.5
    m = _AutoCropDepthMetrics(1e-3, 10.0, "auto")
    m.update(pred, gt)
    crop = gt.clone()
    crop[..., :45, :], crop[..., 471:, :], crop[..., :41], crop[..., 601:] = 0, 0, 0, 0  # rows 45:471, cols 41:601
    torch.testing.assert_close(m.compute()["abs_rel"], depth_metrics(pred, crop)["abs_rel"])
    m2 = _AutoCropDepthMetrics(1e-3, 10.0, "auto")
    m2.update(pred[..., :64, :64], gt[..., :64, :64])  # another size: no crop
    torch.testing.assert_close(m2.compute()["rmse"], depth_metrics(pred[..., :64, :64], gt[..., :64, :64])["rmse"])


def test_slide_windows_follow_mmseg_grid():
    assert slide_windows(48, 64, 32, 21) == [(0, 32, 0, 32), (0, 32, 21, 53), (0, 32, 32, 64),
                                             (16, 48, 0, 32), (16, 48, 21, 53), (16, 48, 32, 64)]
    assert slide_windows(20, 30, 32, 21) == [(0, 20, 0, 30)]


def test_semseg_sliding_window_averages_window_logits():
    torch.manual_seed(0)
    task = SemSegTask(backbone="test_sd", backbone_kwargs=ATTN, num_classes=3, class_names=["sky", "road", "car"],
                      templates=["a photo of a {}."], fpn_channels=8, head_channels=4, slide_crop=32,
                      slide_stride=16).eval()
    assert task.head.in_channels == [16 + 3, 16, 8, 8]  # attention maps of the 3 class tokens at 1/16 only
    x = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        w0, w1, w2 = task(x[..., :32]), task(x[..., 16:48]), task(x[..., 32:])
        expected = torch.zeros(1, 3, 32, 64)
        expected[..., :32] += w0
        expected[..., 16:48] += w1
        expected[..., 32:] += w2
        count = torch.tensor([1.0] * 16 + [2.0] * 32 + [1.0] * 16)
        got = task.predict_logits(x)
    torch.testing.assert_close(got, expected / count, atol=1e-5, rtol=1e-5)


def test_class_embeddings_and_sentences_match_the_text_encoder():
    from diffperc.backbones.registry import create_backbone

    bb = create_backbone("test_sd", **BB)
    te, tok = bb.text_encoder, bb.tokenizer
    templates = ["a photo of a {}.", "a {} in a video game."]
    got = class_embeddings(te, tok, ["living_room", "cat"], templates, max_length=20)
    with torch.no_grad():
        for i, name in enumerate(["living room", "cat"]):
            per = [te(input_ids=tok(t.format(name), padding="max_length", max_length=20,
                                    return_tensors="pt").input_ids).pooler_output[0] for t in templates]
            torch.testing.assert_close(got[i], torch.stack(per).mean(0), atol=1e-6, rtol=1e-5)
        toks = encode_sentences(te, tok, ["the man on the left"], max_length=12)
        ids = tok("the man on the left", padding="max_length", max_length=12, return_tensors="pt").input_ids
        torch.testing.assert_close(toks, te(input_ids=ids).last_hidden_state)
    assert toks.shape == (1, 12, te.config.hidden_size)
    with pytest.raises(ValueError, match="max_tokens"):
        encode_sentences(te, tok, ["x"], max_length=10_000)


def test_param_groups_and_schedule():
    task = DepthTask(backbone="test_sd", backbone_kwargs={**BB, "trainable": True}, neck_channels=16,
                     deconv_channels=8, decoder_channels=8, scene_names=["room"], backbone_lr_mult=0.01,
                     optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1))
    conf = task.configure_optimizers()
    opt = conf["optimizer"]
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert by_name["backbone"]["initial_lr"] == pytest.approx(1e-5) and by_name["head"]["initial_lr"] == pytest.approx(1e-3)
    assert by_name["head"]["lr"] == pytest.approx(1e-3 * vpd_depth_factor(0, 0.48, 0.06))  # schedule applied
    assert conf["lr_scheduler"]["interval"] == "step"
    assert by_name["head_no_decay"]["weight_decay"] == 0 and by_name["head"]["weight_decay"] == 0.1
    assert all(p.ndim <= 1 for p in by_name["backbone_no_decay"]["params"])
    n_trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable
    # VPD depth (train.py), written out: step s counted from 1, R = ramp steps, lr = max * factor
    max_lr, min_lr, ramp = 5e-4, 3e-5, 100
    for s in (1, 50, 99, 100, 150, 200, 250):
        x = s / ramp
        vpd = (max_lr - min_lr) * x**0.9 + min_lr if x < 1 else max(min_lr, (min_lr - max_lr) * (x - 1) ** 0.9 + max_lr)
        assert vpd_depth_factor(s - 1, ramp, min_lr / max_lr) * max_lr == pytest.approx(vpd)
    # mmcv poly + linear warm-up: warm-up lr = regular * (1 - (1 - i / W) * (1 - ratio))
    assert poly_factor(0, 1000, 1.0, 0.0, 100, 1e-6) == pytest.approx(1e-6)
    assert poly_factor(50, 1000, 1.0, 0.0, 100) == pytest.approx((1 - 0.05) * (1 - 0.5 * (1 - 1e-6)))
    assert poly_factor(500, 1000, 0.9) == pytest.approx(0.5**0.9) and poly_factor(1000, 1000) == 0
    assert lr_factor("vpd_depth", 1000, min_ratio=0.06, ramp_fraction=0.5)(999) == pytest.approx(0.06)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("cosine", 10)


# ---------------------------------------------------------------- pictures
def test_depth_image_colours_and_bar():
    depth = torch.linspace(0, 10, 64).expand(32, 64).clone()
    depth[0, 0] = 0  # missing
    img = np.asarray(viz.depth_to_image(depth, max_depth=10.0))
    assert img.shape[0] == 32 and img.shape[1] > 64
    assert tuple(img[0, 0]) == (128, 128, 128)  # missing depth in grey
    expected = (viz.colorize(np.array([[0.5]]))[0, 0] * 255 + 0.5).astype(np.uint8)
    assert np.abs(img[5, 32].astype(int) - expected.astype(int)).max() <= 8  # 5.08 m ~ the middle colour
    assert img[5, 63].sum() > img[5, 5].sum() + 300  # far = bright (inferno)
    bar = img[:, 64 + 4 + 1]
    assert bar[0].sum() > bar[-1].sum() + 300  # colour bar: max at the top


def test_mask_overlay_blends_class_colours():
    image = torch.full((3, 4, 4), 0.5)
    mask = torch.tensor([[0, 1, 255, 2]] * 4)
    out = np.asarray(viz.mask_overlay(image, mask, palette=[(255, 0, 0), (0, 255, 0), (0, 0, 255)], alpha=0.5,
                                      background=2)).astype(int)
    assert tuple(out[0, 0]) == (192, 64, 64) and tuple(out[0, 1]) == (64, 192, 64)  # 0.5 * 128 + 0.5 * 255, rounded
    assert tuple(out[0, 2]) == (128, 128, 128) and tuple(out[0, 3]) == (128, 128, 128)  # ignore, background
    with pytest.raises(ValueError, match="outside the palette"):
        viz.mask_overlay(image, torch.full((4, 4), 7), palette=[(0, 0, 0)])
    assert len(np.unique(viz.label_palette(150), axis=0)) == 150


# ---------------------------------------------------------------- learning check (fast version)
def test_learning_check_depth_through_the_cli(tmp_path):
    """configs/depth/synthetic_vpd_digits.yaml, shortened: 100 steps through ``diffperc fit`` clearly beat the
    untrained model (``diffperc validate``, same seed). Measured: AbsRel 0.267 -> 0.179, RMSE 0.78 -> 0.47,
    d1 0.49 -> 0.81 (~30 s on one thread); benchmarks/bench_learning.py runs the full 300 steps."""
    common = ["--config", str(ROOT / "configs/depth/synthetic_vpd_digits.yaml"), f"--trainer.default_root_dir={tmp_path}",
              "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.enable_checkpointing=false", "--data.init_args.num_train=320", "--data.init_args.num_val=16",
              "--model.init_args.flip_test=false", "--model.init_args.warmup_steps=10"]
    keys = ("val/abs_rel", "val/rmse", "val/d1")
    before = cli_main(["validate", *common]).trainer.callback_metrics
    before = {k: float(before[k]) for k in keys}
    fit = cli_main(["fit", *common, "--trainer.max_steps=100", "--trainer.val_check_interval=50"])
    after = {k: float(fit.trainer.callback_metrics[k]) for k in keys}
    assert fit.trainer.global_step == 100
    assert after["val/abs_rel"] < 0.8 * before["val/abs_rel"], (before, after)
    assert after["val/rmse"] < 0.75 * before["val/rmse"], (before, after)
    assert after["val/d1"] > before["val/d1"] + 0.15, (before, after)
