"""Dense-prediction datasets: NYUv2, ADE20K, RefCOCO, folders, synthetic depth (tiny on-disk copies)."""

from __future__ import annotations

import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_formats import (
    REFCOCO_BOXES,
    SIZE,
    make_ade20k,
    make_depth_folder,
    make_nyu,
    make_refcoco,
    make_seg_folder,
)
from PIL import Image

from diffperc.data._dense import rescale_size
from diffperc.data.ade20k import ADE20K_CLASSES, ADE20KDataModule, ADE20KDataset
from diffperc.data.folder import DepthFolderDataModule, SegFolderDataModule
from diffperc.data.nyu import NYU_SCENES, NYUv2DataModule, NYUv2Dataset, read_split_file, scene_index
from diffperc.data.refcoco import RefCOCODataModule, RefCOCODataset
from diffperc.data.synthetic import SyntheticDepthDataModule, make_scene

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="real-format samples (../shared/fixtures) absent")
pytest.importorskip("pycocotools")


def _rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path), dtype=np.int64)


def _locate(full: torch.Tensor, patch: torch.Tensor) -> tuple[int, int, bool]:
    """(top, left, flipped) of the window of ``full`` (C, H, W) that equals ``patch`` (C, h, w)."""
    h, w = patch.shape[-2:]
    for flipped in (False, True):
        src = full.flip(-1) if flipped else full
        for top in range(full.shape[-2] - h + 1):
            for left in range(full.shape[-1] - w + 1):
                if torch.equal(src[..., top : top + h, left : left + w], patch):
                    return top, left, flipped
    raise AssertionError("the crop is not a window of the (flipped) image")


def _check_aligned(dataset, full_image, full_target, draws: int = 12) -> None:
    """Every random crop/flip moves the image and the target identically; both flips occur."""
    flips = set()
    for seed in range(draws):
        torch.manual_seed(seed)
        random.seed(seed)
        item = dataset[0]
        target = item["depth"] if "depth" in item else item["mask"]
        top, left, flipped = _locate(full_image, item["image"])
        flips.add(flipped)
        src = full_target.flip(-1) if flipped else full_target
        h, w = target.shape[-2:]
        assert torch.equal(src[..., top : top + h, left : left + w], target)
    assert flips == {False, True}


# ---------------------------------------------------------------------------- NYUv2
def test_nyu_items_depth_in_metres_and_scenes(tmp_path):
    root = make_nyu(tmp_path)
    dm = NYUv2DataModule(str(root), crop_size=32, batch_size=2)
    assert dm.scene_names == list(NYU_SCENES) and len(dm.scene_names) == 27
    dm.setup()
    test = dm.datasets["test"]
    assert len(test) == 3 and len(dm.datasets["train"]) == 4  # CRLF test list: 3 entries, no '\r' in names
    for i, (scene, want) in enumerate([("bathroom", 1), ("kitchen", 6), ("office", 25)]):
        item = test[i]
        folder = root / "official_splits/test" / scene
        png = _png(folder / f"sync_depth_{i + 1:05d}.png")
        assert item["name"] == f"{scene}/rgb_{i + 1:05d}.jpg"
        assert item["depth"].dtype == torch.float32 and item["depth"].shape == (1, *SIZE)
        torch.testing.assert_close(item["depth"][0], torch.from_numpy((png / 1000.0).astype(np.float32)),
                                   rtol=0, atol=0)
        assert item["depth"][0, 0, 0] == 0  # invalid stays 0
        assert torch.equal(item["image"], _rgb(folder / f"rgb_{i + 1:05d}.jpg"))
        assert item["scene"].dtype == torch.int64 and item["scene"].item() == want
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["depth"].shape == (2, 1, 32, 32)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1


def test_nyu_scene_rules():
    assert scene_index("kitchen_0028b") == NYU_SCENES.index("kitchen")
    assert scene_index("study_room_0005") == NYU_SCENES.index("study")  # VPD: first substring match
    assert scene_index("study_room_0005", "exact") == NYU_SCENES.index("study_room")
    assert scene_index("office_kitchen_0001a", "exact") == NYU_SCENES.index("office_kitchen")
    assert scene_index("garage_0001") == -1


def test_nyu_train_crop_flip_aligned(tmp_path):
    root = make_nyu(tmp_path)
    ds = NYUv2Dataset(root / "nyudepthv2_train_files_with_gt.txt", root / "sync", train=True, crop_size=(32, 48),
                      color_aug=False, cut_depth_interval=0)
    full_image = _rgb(root / "sync/kitchen_0028b/rgb_00001.jpg")
    full_depth = torch.from_numpy(_png(root / "sync/kitchen_0028b/sync_depth_00001.png") / 1000.0).float()[None]
    _check_aligned(ds, full_image, full_depth)
    assert ds[1]["scene"].item() == NYU_SCENES.index("living_room")


def test_nyu_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)nowhere.*Expected layout.*sync/"):
        NYUv2DataModule(str(tmp_path / "nowhere"))
    root = make_nyu(tmp_path)
    (root / "nyudepthv2_train_files_with_gt.txt").unlink()
    with pytest.raises(FileNotFoundError, match="nyudepthv2_train_files_with_gt.txt.*does not exist"):
        NYUv2DataModule(str(root))
    bad = root / "official_splits/test/bathroom/sync_depth_00001.png"
    Image.fromarray((_png(bad) // 100).astype(np.uint8)).save(bad)  # an 8-bit depth map
    ds = NYUv2Dataset(root / "nyudepthv2_test_files_with_gt.txt", root / "official_splits/test")
    with pytest.raises(ValueError, match="sync_depth_00001.png is a 8-bit PNG"):
        ds[0]
    split = tmp_path / "split.txt"
    split.write_text("garage_0001/rgb_1.jpg garage_0001/d_1.png 518.8579\n")
    with pytest.raises(ValueError, match="line 1: scene folder 'garage_0001'"):
        read_split_file(split)
    split.write_text("a.jpg\n")
    with pytest.raises(ValueError, match="line 1: expected 'rgb_path depth_path"):
        read_split_file(split)


@needs_fixtures
def test_nyu_real_split_files(tmp_path):
    import json

    nyu = FIXTURES / "nyu_depth_v2"
    assert list(NYU_SCENES) == json.loads((nyu / "vpd/nyu_class_list.json").read_text())
    bts = read_split_file(nyu / "bts/nyudepthv2_test_files_with_gt.txt")
    vpd = read_split_file(nyu / "vpd/test_list.txt")
    assert len(bts) == 654 and bts == vpd  # leading slash and the focal field do not matter
    assert bts[0] == ("bathroom/rgb_00045.jpg", "bathroom/sync_depth_00045.png", NYU_SCENES.index("bathroom"))
    crlf = tmp_path / "test_list_crlf.txt"
    crlf.write_bytes((nyu / "vpd/test_list.txt").read_bytes().replace(b"\n", b"\r\n"))
    assert read_split_file(crlf) == vpd
    exact = read_split_file(nyu / "bts/nyudepthv2_test_files_with_gt.txt", "exact")
    assert all(NYU_SCENES[s] == Path(rgb).parent.name for rgb, _, s in exact)


# ---------------------------------------------------------------------------- ADE20K
def test_ade20k_labels_reduce_zero(tmp_path):
    root = make_ade20k(tmp_path)
    dm = ADE20KDataModule(str(tmp_path), crop_size=32, scale=None, batch_size=2)  # parent folder is accepted
    assert dm.class_names == list(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150
    dm.setup()
    item = dm.datasets["val"][0]
    stored = torch.from_numpy(_png(root / "annotations/validation/ADE_val_00000001.png"))
    expected = torch.where(stored == 0, 255, stored - 1)
    assert item["mask"].dtype == torch.int64 and torch.equal(item["mask"], expected)
    assert {0, 149, 255} <= set(item["mask"].unique().tolist())
    assert torch.equal(item["image"], _rgb(root / "images/validation/ADE_val_00000001.jpg"))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 149, 255}


def test_ade20k_train_crop_flip_aligned(tmp_path):
    root = make_ade20k(tmp_path)
    ds = ADE20KDataset(root, "train", train=True, crop_size=(32, 48), scale=None, ratio_range=(1.0, 1.0),
                       cat_max_ratio=1.0, color_aug=False)
    stored = torch.from_numpy(_png(root / "annotations/training/ADE_train_00000001.png"))
    _check_aligned(ds, _rgb(root / "images/training/ADE_train_00000001.jpg"), torch.where(stored == 0, 255,
                                                                                           stored - 1))


def test_ade20k_resize_rules(tmp_path):
    assert rescale_size(300, 400, (2048, 512)) == (512, 683)  # short side to 512
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side capped at 2048
    root = make_ade20k(tmp_path)
    ds = ADE20KDataset(root, "val", scale=(128, 32), eval_label_size="resized")
    item = ds[0]
    assert item["image"].shape == (3, 32, 43) and item["mask"].shape == (32, 43)
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2, 149, 255}  # nearest: no new labels
    original = ADE20KDataset(root, "val", scale=(128, 32))[0]  # mmseg scores at the annotation's size
    stored = torch.from_numpy(_png(root / "annotations/validation/ADE_val_00000001.png"))
    assert original["image"].shape == (3, 32, 43) and torch.equal(original["mask"], torch.where(stored == 0, 255,
                                                                                                   stored - 1))
    train = ADE20KDataset(root, "train", train=True, crop_size=64, scale=(128, 32), ratio_range=(0.5, 0.5))
    big = train[0]  # resized to 16x21, then padded: image grey (mmseg pads 0 after normalising), label 255
    assert big["image"].shape == (3, 64, 64) and (big["mask"][16:] == 255).all()
    assert (big["image"][:, 16:] == 0.5).all()


def test_ade20k_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)no images/ and annotations/.*Expected layout.*validation"):
        ADE20KDataModule(str(tmp_path / "missing"))
    root = make_ade20k(tmp_path)
    bad = root / "annotations/validation/ADE_val_00000002.png"
    labels = _png(bad)
    labels[0, 0] = 151
    Image.fromarray(labels.astype(np.uint8)).save(bad)
    with pytest.raises(ValueError, match=r"ADE_val_00000002.png has label values \[151\] outside 0..150"):
        ADE20KDataset(root, "val")[1]
    (root / "annotations/training/ADE_train_00000003.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000003.png"):
        ADE20KDataset(root, "train")


@needs_fixtures
def test_ade20k_real_samples(tmp_path):
    ade = FIXTURES / "ade20k"
    names = [line.split("\t")[4].split(",")[0].strip() for line in (ade / "objectInfo150.txt").read_text().splitlines()[1:]]
    assert tuple(names) == ADE20K_CLASSES
    root = tmp_path / "ADEChallengeData2016"
    for sub, suffix in (("images", "jpg"), ("annotations", "png")):
        for split in ("training", "validation"):
            (root / sub / split).mkdir(parents=True)
            for i in (1, 2, 3):
                (root / sub / split / f"ADE_val_0000000{i}.{suffix}").symlink_to(ade / sub / f"ADE_val_0000000{i}.{suffix}")
    val = ADE20KDataset(root, "val")
    item = val[0]  # 683x512 (WxH): short side already 512
    stored = torch.from_numpy(_png(ade / "annotations/ADE_val_00000001.png"))
    assert item["image"].shape == (3, 512, 683) and torch.equal(item["mask"], torch.where(stored == 0, 255, stored - 1))
    assert set(item["mask"].unique().tolist()) == {255, 0, 1, 2, 4, 6, 9, 17}
    assert val[2]["image"].shape == (3, 512, 683)  # 400x300 upscaled to short side 512
    torch.manual_seed(0)
    crop = ADE20KDataset(root, "train", train=True)[1]
    assert crop["image"].shape == (3, 512, 512) and crop["mask"].shape == (512, 512)


# ---------------------------------------------------------------------------- RefCOCO
def _box_mask(box, size=SIZE) -> torch.Tensor:
    x0, y0, x1, y1 = box
    mask = torch.zeros(size, dtype=torch.int64)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_refcoco_items_and_masks(tmp_path):
    root = make_refcoco(tmp_path)
    val = RefCOCODataset(root, "refcoco", "unc", "val", image_size=None)
    val_refs = [(i, b) for i, b in enumerate(REFCOCO_BOXES) if b[1] == "val"]
    assert len(val) == 2 * len(val_refs)  # one item per sentence
    for k, (ref_id, (_, _, box, kind)) in enumerate(val_refs):
        item = val[2 * k + 1]
        assert item["name"] == f"{ref_id}_1" and item["sentence"] == f"object {ref_id} view 1"  # cleaned `sent`
        assert item["mask"].dtype == torch.int64 and item["image"].shape == (3, *SIZE)
        want = _box_mask(box)
        if kind == "rle":
            assert torch.equal(item["mask"], want)
        else:  # a polygon through the box corners: area and IoU close to the rectangle's
            inter = (item["mask"] & want).sum().item()
            union = (item["mask"] | want).sum().item()
            x0, y0, x1, y1 = box
            assert abs(item["mask"].sum().item() - (x1 - x0) * (y1 - y0)) <= (x1 - x0) + (y1 - y0) + 1
            assert inter / union > 0.9
    raw = RefCOCODataset(root, "refcoco", "unc", "val", image_size=None, sentence_field="raw")
    assert raw[1]["sentence"] == f"Object {val_refs[0][0]}, view 1"
    with pytest.raises(ValueError, match="sentence_field"):
        RefCOCODataset(root, "refcoco", "unc", "val", sentence_field="tokens")
    train = RefCOCODataset(root, "refcoco", "unc", "train", train=True, image_size=32)
    assert len(train) == sum(b[1] == "train" for b in REFCOCO_BOXES)  # one item per ref
    np.random.seed(0)  # VPD draws the sentence with np.random.choice
    sentences = {train[0]["sentence"] for _ in range(20)}
    assert sentences == {"object 0 view 0", "object 0 view 1"}
    item = train[1]  # RLE box (40, 16, 60, 44) on 64x48 -> 32x32, nearest
    assert item["image"].shape == (3, 32, 32) and set(item["mask"].unique().tolist()) == {0, 1}
    assert abs(item["mask"].float().mean().item() - 20 * 28 / (64 * 48)) < 0.03


def test_refcoco_datamodule_and_bad_input(tmp_path):
    root = make_refcoco(tmp_path, dataset="refcocog", split_by="umd")
    dm = RefCOCODataModule(str(root), dataset="refcocog", split_by="umd", image_size=32, test_split="testA",
                           batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert isinstance(batch["sentence"], list) and len(batch["sentence"]) == 2
    assert len(dm.datasets["test"]) == 2
    with pytest.raises(ValueError, match=r"no refs with split 'testC'; it has splits \['testA', 'testB', 'train'"):
        RefCOCODataset(root, "refcocog", "umd", "testC")
    with pytest.raises(FileNotFoundError, match=r"(?s)refs\(unc\).p does not exist.*Expected layout"):
        RefCOCODataset(root, "refcocog", "unc", "val")
    with pytest.raises(FileNotFoundError, match="(?s)refcoco does not exist.*Expected layout"):
        RefCOCODataModule(str(root), dataset="refcoco")
    (root / "refcocog" / "refs(google).p").write_bytes(pickle.dumps([OrderedDict(ref_id=1)]))
    with pytest.raises(ValueError, match="refused object collections.OrderedDict"):
        RefCOCODataset(root, "refcocog", "google", "val")


# ---------------------------------------------------------------------------- folders
def test_depth_folder(tmp_path):
    root = make_depth_folder(tmp_path)
    dm = DepthFolderDataModule(str(root), crop_size=32, batch_size=2, depth_scale=256.0)
    dm.setup()
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 1 and dm.scene_names == ["scene"]
    item = dm.datasets["val"][0]
    png = _png(root / "depth" / f"{item['name']}.png")
    assert torch.equal(item["depth"][0], torch.from_numpy((png / 256.0).astype(np.float32)))
    assert item["scene"].item() == 0
    full = _rgb(root / "images/img_000.png")
    depth = torch.from_numpy(_png(root / "depth/img_000.png") / 256.0).float()[None]
    ds = dm.datasets["train"]
    ds.names = ["img_000"]
    _check_aligned(ds, full, depth)
    (root / "train.txt").write_text("img_000\nimg_001\n")
    (root / "val.txt").write_text("img_004\r\n")
    listed = DepthFolderDataModule(str(root), train_list="train.txt", val_list="val.txt")
    assert listed.train_names == ["img_000", "img_001"] and listed.val_names == ["img_004"]
    Image.fromarray((png // 100).astype(np.uint8)).save(root / "depth" / "img_002.png")
    with pytest.raises(ValueError, match="img_002.png is a 8-bit PNG"):
        dm.datasets["train"].__class__(root, ["img_002"], "depth")[0]
    (root / "depth/img_003.png").unlink()
    with pytest.raises(FileNotFoundError, match="(?s)depth/img_003.png.*Expected layout"):
        DepthFolderDataModule(str(root))


def test_seg_folder(tmp_path):
    root = make_seg_folder(tmp_path)
    dm = SegFolderDataModule(str(root), num_classes=4, crop_size=32, val_fraction=0.4, batch_size=2)
    dm.setup()
    assert len(dm.datasets["val"]) == 2 and dm.class_names == ["class 0", "class 1", "class 2", "class 3"]
    item = dm.datasets["val"][0]
    assert torch.equal(item["mask"], torch.from_numpy(_png(root / "masks" / f"{item['name']}.png")))
    assert 255 in item["mask"].unique().tolist()
    ds = dm.datasets["train"]
    _check_aligned(ds, _rgb(root / "images" / f"{ds.names[0]}.jpg"),
                   torch.from_numpy(_png(root / "masks" / f"{ds.names[0]}.png")))
    with pytest.raises(ValueError, match=r"masks/img_00\d.png has class ids \[3\] outside 0..2"):
        SegFolderDataModule(str(root), num_classes=3).train_dataloader().dataset[0]
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes is 4"):
        SegFolderDataModule(str(root), num_classes=4, class_names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="(?s)nothing does not exist.*masks/<name>.png"):
        SegFolderDataModule(str(tmp_path / "nothing"), num_classes=4)


# ---------------------------------------------------------------------------- synthetic
def test_synthetic_depth_is_seeded_and_recoverable():
    image, depth = make_scene(7, 32)
    again, depth2 = make_scene(7, 32)
    assert torch.equal(image, again) and torch.equal(depth, depth2)
    assert not torch.equal(make_scene(8, 32)[1], depth)
    dm = SyntheticDepthDataModule(num_train=8, num_val=4, image_size=32, batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["depth"].shape == (4, 1, 32, 32)
    assert batch["depth"].min() >= 1.0 and batch["depth"].max() <= 5.0 and (batch["scene"] == 0).all()
    # independent inverse of the shading: depth from the channel-mean brightness
    shade = batch["image"].mean(1, keepdim=True) / (1 - 0.15 / 2)
    estimate = 1.0 + (1 - shade) / 0.75 * 4.0
    assert (estimate - batch["depth"]).abs().mean() < 0.25
    names = {dm.datasets["train"][i]["name"] for i in range(8)} | {n for n in batch["name"]}
    assert len(names) == 12  # train and val scenes differ
