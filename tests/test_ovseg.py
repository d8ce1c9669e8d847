"""OVDiff in diffperc: support-set cache and resume, mask proposers, loaders on tiny copies of the real formats,
the end-to-end segmenter on test_sd, the Lightning task and every configs/ovseg YAML through the CLI, the real
check script in a tiny run, bad input. Literal-port parity tests are in test_fidelity_ovseg.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffperc import create_backbone
from diffperc.cli import cli_main
from diffperc.data.ovseg import CONTEXT_CLASSES, VOC_CLASSES, OVSegDataModule, OVSegDataset, digit_scenes
from diffperc.zeroshot.ovseg import OVDiff, prediction_picture
from diffperc.zeroshot.ovseg import support as support_mod
from diffperc.zeroshot.ovseg.masks import CallableProposer, load_proposer, support_masks
from diffperc.zeroshot.ovseg.support import class_token_group, sample_support_set

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "ovseg").glob("*.yaml"))
TINY = dict(n_support=2, num_inference_steps=2, sample_batch_size=2, kmeans=2, vit_size=32, size=32,
            crops=(32, 24), strides=(16, 16), progress=False)


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["diffperc"])


@pytest.fixture(scope="module")
def bb():
    return create_backbone("test_sd")


# ---------------------------------------------------------------------------- tiny copies of the formats
_VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def _jpg(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(np.kron(rng.integers(0, 256, (h // 8, w // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)).save(path)


def _labels(h: int, w: int, values: list[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.choice(values, (h // 8, w // 8)), np.ones((8, 8))).astype(np.uint8)


def make_voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    ids = ["2007_000033", "2007_000042"]
    for i, name in enumerate(ids):
        _jpg(base / "JPEGImages" / f"{name}.jpg", 40, 48, i)
        lab = _labels(40, 48, [0, 8, 15, 255], i)  # background, cat, person, void
        png = Image.fromarray(lab, mode="P")
        png.putpalette(_VOC_PALETTE)  # palette PNG: the index is the label
        (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        png.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def make_context(root: Path, values: tuple[int, ...] = (0, 15, 47, 59)) -> Path:
    base = root / "VOC2010"
    ids = ["2008_000002", "2008_000008"]
    for i, name in enumerate(ids):
        _jpg(base / "JPEGImages" / f"{name}.jpg", 32, 40, i + 5)
        (base / "SegmentationClassContext").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_labels(32, 40, list(values), i)).save(base / "SegmentationClassContext" / f"{name}.png")
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\r\n".join(ids) + "\r\n")  # CRLF too
    return base


def make_coco_object(root: Path, values: tuple[int, ...] = (0, 1, 17, 255)) -> Path:
    for i, stem in enumerate(["000000000139", "000000000285"]):
        _jpg(root / "images" / "val2017" / f"{stem}.jpg", 32, 48, i + 9)
        (root / "annotations" / "val2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_labels(32, 48, list(values), i)).save(
            root / "annotations" / "val2017" / f"{stem}_instanceTrainIds.png")
    return root


def test_voc_loader_reads_palette_pngs(tmp_path):
    root = make_voc(tmp_path)
    for r in (root, root / "VOCdevkit", root / "VOCdevkit" / "VOC2012"):  # any level finds VOC2012
        ds = OVSegDataset("voc", r)
        assert len(ds) == 2
    item = ds[1]
    assert item["image"].shape == (3, 40, 48) and item["image"].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0, 8, 15, 255}
    assert torch.equal(item["mask"], torch.from_numpy(_labels(40, 48, [0, 8, 15, 255], 1)).long())
    assert VOC_CLASSES[8] == "cat" and VOC_CLASSES[15] == "person" and len(VOC_CLASSES) == 21


def test_context_59_drops_background_and_60_keeps_it(tmp_path):
    root = make_context(tmp_path)
    lab = torch.from_numpy(_labels(32, 40, [0, 15, 47, 59], 0)).long()
    m60 = OVSegDataset("context60", root)[0]["mask"]
    m59 = OVSegDataset("context59", tmp_path)[0]["mask"]
    assert torch.equal(m60, lab)
    assert torch.equal(m59, torch.where(lab == 0, 255, lab - 1))  # mmseg reduce_zero_label
    dm59, dm60 = OVSegDataModule("context59", str(root)), OVSegDataModule("context60", str(root))
    assert dm59.eval_classes == list(CONTEXT_CLASSES[1:]) and dm60.eval_classes == list(CONTEXT_CLASSES)
    assert dm59.classes == dm60.classes and len(dm59.classes) == 59 and "sky" in dm59.stuff and len(dm59.stuff) == 19
    assert CONTEXT_CLASSES[15] == "cat" and CONTEXT_CLASSES[47] == "sky" and CONTEXT_CLASSES[59] == "wood"


def test_coco_object_loader(tmp_path):
    root = make_coco_object(tmp_path)
    ds = OVSegDataset("coco_object", root, split="val2017")
    assert [it[2] for it in ds.items] == ["000000000139", "000000000285"]
    assert set(ds[0]["mask"].unique().tolist()) <= {0, 1, 17, 255}
    dm = OVSegDataModule("coco_object", str(root), split="val2017")
    assert len(dm.eval_classes) == 81 and dm.eval_classes[1] == "person" and dm.eval_classes[16] == "cat" and dm.eval_classes[17] == "dog"


def test_loaders_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation/val.txt"):
        OVSegDataset("voc", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OVSegDataset("voc", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="instanceTrainIds"):
        OVSegDataset("coco_object", tmp_path)
    with pytest.raises(ValueError, match="dataset must be one of"):
        OVSegDataModule("ade")
    with pytest.raises(ValueError, match="needs root"):
        OVSegDataModule("voc")
    root = make_voc(tmp_path / "v")
    bad = root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad)
    with pytest.raises(ValueError, match="is \\(8, 8\\) but"):
        OVSegDataset("voc", root)[0]


def test_digit_scenes_labels_follow_the_ink():
    images, masks, slots = digit_scenes(12, seed=3)
    assert images.shape == (12, 3, 64, 64) and masks.shape == (12, 64, 64)
    ink = images[:, 0]
    assert ((masks > 0) & (masks < 255) == (ink > 0.5) & (masks != 255)).all()
    assert (masks[ink <= 0.15] == 0).all()
    for s in range(12):
        present = {int(v) - 1 for v in masks[s].unique() if 0 < v < 255}
        assert present <= {int(d) for d in slots[s] if d >= 0} and 1 <= (slots[s] >= 0).sum() <= 3
    assert torch.equal(digit_scenes(12, seed=3)[1], masks)  # seeded


# ---------------------------------------------------------------------------- support sets
def test_class_token_group_finds_the_words(bb):
    tok = bb.tokenizer
    prompt = "A good picture of a potted plant"
    group = class_token_group(tok, prompt, "potted plant")
    ids = tok(prompt).input_ids
    assert ids[group[0]: group[-1] + 1] == tok("potted plant", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="must appear"):
        class_token_group(tok, prompt, "cat")


def test_support_set_cache_and_resume(bb, tmp_path, monkeypatch):
    kw = dict(num_images=5, batch_size=2, num_inference_steps=2, progress=False)
    full = sample_support_set(bb, "cat", cache_dir=tmp_path / "a", **kw)
    assert full.images.shape == (5, 3, 32, 32) and full.images.dtype == torch.uint8
    assert full.heatmaps.shape == (5, 1, 32, 32) and full.heatmaps.amin() == 0 and full.heatmaps.amax() == 1
    meta = json.loads((full.folder / "meta.json").read_text())
    assert meta["complete"] and meta["prompt"] == "A good picture of a cat" and meta["n"] == 5
    # a second call reads the cache: no sampling at all
    monkeypatch.setattr(support_mod, "sample_with_heatmaps", lambda *a, **k: pytest.fail("resampled"))
    again = sample_support_set(bb, "cat", cache_dir=tmp_path / "a", **kw)
    assert torch.equal(again.images, full.images) and torch.allclose(again.heatmaps, full.heatmaps)
    monkeypatch.undo()
    # interrupted after the second batch: the rerun resumes at image 4 with the saved generator state
    real, calls = support_mod.sample_with_heatmaps, []

    def dying(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(support_mod, "sample_with_heatmaps", dying)
    with pytest.raises(KeyboardInterrupt):
        sample_support_set(bb, "cat", cache_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(support_mod, "sample_with_heatmaps", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
    resumed = sample_support_set(bb, "cat", cache_dir=tmp_path / "b", **kw)
    assert calls == [2, 2, 1, 1]  # two batches kept, the third was lost, then only the last image is sampled
    assert torch.equal(resumed.images, full.images)
    torch.testing.assert_close(resumed.heatmaps, full.heatmaps)
    # another seed, another model: other cache entries
    other = sample_support_set(bb, "cat", cache_dir=tmp_path / "a", seed=1, **kw)
    assert other.folder != full.folder and not torch.equal(other.images, full.images)
    other_model = sample_support_set(create_backbone("test_sd", seed=1), "cat", cache_dir=tmp_path / "a", **kw)
    assert other_model.folder.parent != full.folder.parent


def test_support_set_bad_input(bb):
    with pytest.raises(ValueError, match="exactly one"):
        sample_support_set(bb, "cat", template="a photo", num_images=1, progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        sample_support_set(bb, "cat", num_images=0, progress=False)


# ---------------------------------------------------------------------------- masks
def test_proposers_and_mask_cache(bb, tmp_path):
    support = sample_support_set(bb, "dog", num_images=2, batch_size=2, num_inference_steps=2, cache_dir=tmp_path,
                                 progress=False)
    fg, bg = support_masks(support, load_proposer("threshold"))
    assert torch.equal(fg, support.heatmaps[:, 0] > 0.5) and torch.equal(bg, support.heatmaps[:, 0] < 0.2)
    assert (support.folder / "masks" / "threshold-fg0.5-bg0.2" / "complete").exists()
    # a user's proposer (the CutLER / SAM hook): one box instance
    def boxes(image):
        m = torch.zeros(1, *image.shape[-2:], dtype=torch.bool)
        m[0, 8:24, 8:24] = True
        return m

    fg2, bg2 = support_masks(support, CallableProposer(boxes, "box"))
    assert fg2.shape == (2, 32, 32) and not (fg2 & bg2).any()
    assert all(torch.equal(f, b) or torch.equal(f, ~b) for f, b in zip(fg2, boxes(support.images[0]).expand(2, -1, -1),
                                                                         strict=True))
    mc = load_proposer("maskcut:test_dino")
    masks = mc(support.float_images()[0])
    assert masks.dtype == torch.bool and masks.shape[1:] == (32, 32) and len(masks) <= 3
    with pytest.raises(ValueError, match="mask_proposer"):
        load_proposer("cutler")
    with pytest.raises(ValueError, match="cannot import"):
        load_proposer("nonexistent_pkg:fn")
    with pytest.raises(ValueError, match="must return"):
        CallableProposer(lambda im: torch.zeros(3, 3), "bad")(torch.zeros(3, 8, 8))


# ---------------------------------------------------------------------------- end to end
def test_ovdiff_end_to_end_on_test_sd(bb, tmp_path):
    kw = dict(TINY, extractors=["sd", "test_dino", "test_clip"], mask_proposer="maskcut:test_dino",
              clip_filter="test_clip", cache_dir=tmp_path)
    ov = OVDiff(bb, **kw)
    ov.prepare(["cat", "dog", "sky"], stuff=["sky"])
    assert [b.protos.shape[:2] for b in ov.banks] == [(2, 3)] * 3
    assert not ov.banks[0].mask[0, 2].any()  # the stuff class has no bg prototypes
    image = torch.rand(3, 40, 52)
    labels = ov.predict(image)
    assert labels.shape == (40, 52) and labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 3
    keep = ov.kept_classes(resize_small(image))
    assert keep[2]  # stuff is always kept
    # the same settings load everything from the cache and give the same labels
    ov2 = OVDiff(bb, **kw)
    ov2.prepare(["cat", "dog", "sky"], stuff=["sky"])
    assert torch.equal(ov2.predict(image), labels)
    nobg = ov.predict(image, drop_background=True)  # argmax over the classes only
    assert nobg.max() <= 2 and torch.equal(nobg[labels > 0] + 1, labels[labels > 0])
    pic = prediction_picture(image, labels, ["background", "cat", "dog", "sky"], gt=labels)
    assert pic.width > 3 * 52 and ov.support_picture("cat").width > 0
    with pytest.raises(ValueError, match="not in classes"):
        ov.prepare(["cat"], stuff=["sky"])
    with pytest.raises(ValueError, match="distinct"):
        ov.prepare(["cat", "cat"])
    with pytest.raises(ValueError, match="image must be"):
        ov.predict(torch.rand(40, 52))
    with pytest.raises(RuntimeError, match="prepare"):
        OVDiff(bb, **kw).scores(image)


def resize_small(image):
    from diffperc.zeroshot.ovseg.segmenter import resize_for_inference

    return resize_for_inference(image, 32)


def test_drop_background_argmax_is_over_classes_only():
    from diffperc.zeroshot.ovseg.inference import labels_from_scores

    s = torch.tensor([[[0.9, -0.5]], [[0.2, -0.2]], [[0.1, -0.1]]])  # (1 + 2, 1, 2)
    assert labels_from_scores(s).tolist() == [[0, 0]]
    assert labels_from_scores(s, drop_background=True).tolist() == [[0, 0]]
    s[2, 0, 0] = 0.5
    assert labels_from_scores(s, drop_background=True).tolist() == [[1, 0]]


# ---------------------------------------------------------------------------- task and configs through the CLI
def _overrides(config: Path, tmp_path: Path, roots: dict[str, Path]) -> list[str]:
    common = ["--model.init_args.backbone=test_sd", "--trainer.accelerator=cpu", "--data.init_args.num_workers=0",
              f"--model.init_args.cache_dir={roots['cache']}", f"--model.init_args.output_dir={tmp_path / 'out'}",
              f"--trainer.default_root_dir={tmp_path}",
              "--model.init_args.n_support=1", "--model.init_args.num_inference_steps=1",
              "--model.init_args.kmeans=0", "--model.init_args.size=32", "--model.init_args.crops=[32]",
              "--model.init_args.strides=[16]", "--model.init_args.progress=false",
              "--model.init_args.save_predictions=1", "--data.init_args.limit=1"]
    if "digits" in config.name:
        return common + ["--model.init_args.save_support=true"]
    vit = ["--model.init_args.extractors=[sd,test_dino,test_clip]", "--model.init_args.mask_proposer=threshold",
           "--model.init_args.clip_filter=test_clip", "--model.init_args.vit_size=32",
           "--model.init_args.save_support=false"]
    key = {"voc": "voc", "context59": "context", "context60": "context", "cocoobject": "coco"}[config.name.split("_")[0]]
    return common + vit + [f"--data.init_args.root={roots[key]}"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("ovseg_data")
    return {"voc": make_voc(base / "voc"), "context": make_context(base / "ctx", values=[0, 1, 3, 4]),
            "coco": make_coco_object(base / "coco", values=[0, 1, 3, 255]), "cache": base / "cache"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_configs_print_and_run_on_test_sd(config, roots, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        cli_main(["test", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    # Context (59 classes) and COCO-Object (80) run on their first classes only, to stay in seconds;
    # the Context ones keep a stuff class (bedclothes), so the stuff path runs too
    import diffperc.data.ovseg as ovseg_data

    monkeypatch.setattr(ovseg_data, "CONTEXT_CLASSES", CONTEXT_CLASSES[:5])
    monkeypatch.setattr(ovseg_data, "COCO_OBJECT_CLASSES", ovseg_data.COCO_OBJECT_CLASSES[:4])
    cli = cli_main(["test", "--config", str(config), *_overrides(config, tmp_path, roots)])
    model, dm = cli.model, cli.datamodule
    res = json.loads((tmp_path / "out" / "miou.json").read_text())
    assert set(res["iou"]) == set(dm.eval_classes) and 0 <= res["miou"] <= 1
    assert abs(cli.trainer.callback_metrics["test/miou"].item() - res["miou"]) < 1e-6
    assert len(list((tmp_path / "out" / "predictions").glob("*.png"))) == 1
    if "digits" in config.name:
        assert len(list((tmp_path / "out" / "support").glob("*.png"))) == 10
    assert model.ovdiff.classes == dm.classes and model.drop_background == ("context59" in config.name)
    if "context" in config.name:
        assert model.ovdiff.stuff == ["bedclothes"] and not model.ovdiff.banks[0].mask[0, 3].any()


def test_task_miou_equals_an_independent_count(roots, tmp_path):
    """The task's mIoU over the tiny VOC copy = IoU counted by hand from the task's own predictions."""
    cli = cli_main(["test", "--config", str(ROOT / "configs/ovseg/voc_ovdiff_sd15.yaml"),
                    *_overrides(ROOT / "configs/ovseg/voc_ovdiff_sd15.yaml", tmp_path, roots), "--data.init_args.limit=2"])
    model = cli.model
    ds = OVSegDataset("voc", roots["voc"])
    inter, union = np.zeros(21), np.zeros(21)
    for i in range(2):
        item = ds[i]
        pred = model.ovdiff.predict(item["image"]).numpy()
        gt = item["mask"].numpy()
        keep = gt != 255
        for c in range(21):
            p, g = (pred == c) & keep, (gt == c) & keep
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        expect = np.nanmean(inter / union)
    assert abs(model.results["miou"] - expect) < 1e-6


# ---------------------------------------------------------------------------- the real check, tiny
def test_real_check_script_tiny_run(tmp_path):
    from script_helpers import load_script

    mod = load_script("ovseg_digits_check")
    out = mod.main(["--n-support", "2", "--scenes", "3", "--val-scenes", "2", "--steps", "2", "--kmeans", "2",
                    "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    assert set(out["results"]) == {"ovdiff", "ovdiff_no_bg", "ovdiff_ink_masks", "random_unet",
                                   "random_unet_ink_masks", "attention"}
    assert out["heatmap_on_ink"] > 0
    for name, preds in out["predictions"].items():
        gt = out["masks"]
        keep = gt != 255
        inter = [((preds == c) & (gt == c) & keep).sum().item() for c in range(11)]
        union = [(((preds == c) | (gt == c)) & keep).sum().item() for c in range(11)]
        expect = np.nanmean([i / u if u else np.nan for i, u in zip(inter, union, strict=True)])
        assert abs(out["results"][name]["miou"] - expect) < 1e-6
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["results"]["ovdiff"]["miou"] == out["results"]["ovdiff"]["miou"]
    assert (tmp_path / "o" / "00_ovdiff.png").exists()
