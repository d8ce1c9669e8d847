"""COD10K-v3 / NC4K / COCO instance loaders on tiny copies of the released on-disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

from camouflage_formats import _write_image, make_cod10k, write_coco  # noqa: E402

from diffperc.data.camouflage import (  # noqa: E402
    CamouflageDataModule,
    CocoInstanceDataModule,
    CocoInstanceDataset,
    ImageFolderDataset,
    letterbox,
)


def test_letterbox_keeps_aspect_and_pads_grey() -> None:
    img = torch.rand(3, 40, 60)
    out, hw = letterbox(img, 32)
    assert out.shape == (3, 32, 32) and hw == (21, 32)
    assert torch.all(out[:, 21:] == 0.5)


def test_eval_items_masks_labels_and_original_size(tmp_path: Path) -> None:
    info = write_coco(tmp_path / "ann.json", tmp_path / "img", ["crab", "owl"])
    ds = CocoInstanceDataset(tmp_path / "ann.json", tmp_path / "img", image_size=32)
    assert ds.class_names == ["crab", "owl"] and len(ds) == 3
    a = ds[0]  # image id 1 (sorted by id): the polygon
    assert a["name"] == "cam_a.jpg" and a["labels"].tolist() == [0]
    assert a["orig_masks"].shape == (1, 48, 32) and a["masks"].shape == (1, 32, 32)
    m = a["orig_masks"][0].numpy()
    assert m[10:20, 6:12].all() and m[30:].sum() == 0 and m[:, 20:].sum() == 0
    assert abs(int(m.sum()) - 200) <= 30  # 10 x 20 polygon, boundary pixels aside
    b = ds[1]  # image id 3: RLE instance (class owl) + crowd
    assert b["labels"].tolist() == [1, 0] and b["iscrowd"].tolist() == [0, 1]
    assert (b["orig_masks"][0].numpy() == info["rle_mask"]).all()
    assert (b["orig_masks"][1].numpy() == info["crowd"]).all()
    assert b["size"].tolist() == [21, 32] and b["orig_size"].tolist() == [40, 60]
    assert b["masks"][:, 21:].sum() == 0  # padding carries no mask
    assert ds[2]["masks"].shape == (0, 32, 32)  # an image without instances stays in evaluation


def test_train_items_drop_crowd_and_empty_images(tmp_path: Path) -> None:
    write_coco(tmp_path / "ann.json", tmp_path / "img", ["crab", "owl"])
    ds = CocoInstanceDataset(tmp_path / "ann.json", tmp_path / "img", image_size=32, train=True, class_agnostic=True)
    assert len(ds) == 2 and ds.class_names == ["foreground"]
    item = ds[1]
    assert item["labels"].tolist() == [0] and "orig_masks" not in item


def test_cod10k_and_nc4k_datamodules(tmp_path: Path) -> None:
    make_cod10k(tmp_path)
    dm = CamouflageDataModule(str(tmp_path), "cod10k", image_size=32, batch_size=2)
    dm.setup()
    assert dm.class_names == ["foreground"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and len(batch["masks"]) == 2
    test = next(iter(dm.test_dataloader()))
    assert "orig_masks" in test and test["size"].shape == (2, 2)
    nc = CamouflageDataModule(str(tmp_path), "nc4k", image_size=32)
    nc.setup()
    assert len(nc.datasets["test"]) == 3
    with pytest.raises(ValueError, match="no train split"):
        nc.train_dataloader()


def test_raw_cod10k_file_names_are_found(tmp_path: Path) -> None:
    cod = tmp_path / "COD10K-v3"
    write_coco(cod / "Train" / "CAM_Instance_Train.json", cod / "Train" / "Image", ["crab", "owl"])
    write_coco(cod / "Test" / "CAM_Instance_Test.json", cod / "Test" / "Image", ["crab", "owl"])
    dm = CamouflageDataModule(str(tmp_path), "cod10k", image_size=32, class_agnostic=False)
    assert dm.class_names == ["crab", "owl"]


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        CamouflageDataModule(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="test2026.json"):
        CamouflageDataModule(str(tmp_path), "cod10k")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "img").mkdir()
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoInstanceDataset(tmp_path / "bad.json", tmp_path / "img")
    (tmp_path / "nococo.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="lacks"):
        CocoInstanceDataset(tmp_path / "nococo.json", tmp_path / "img")
    write_coco(tmp_path / "ann.json", tmp_path / "img2", ["crab"])
    data = json.loads((tmp_path / "ann.json").read_text())
    data["annotations"][0]["category_id"] = 9
    (tmp_path / "ann9.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category_id 9"):
        CocoInstanceDataset(tmp_path / "ann9.json", tmp_path / "img2")
    with pytest.raises(ValueError, match="both"):
        CocoInstanceDataModule(train_json=str(tmp_path / "ann.json"))


def test_image_folder_for_predict(tmp_path: Path) -> None:
    _write_image(tmp_path / "a" / "x.png", 20, 30, 0)
    _write_image(tmp_path / "y.jpg", 30, 20, 1)
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert [ds[i]["name"] for i in range(len(ds))] == ["a/x.png", "y.jpg"]
    assert ds[0]["image"].shape == (3, 16, 16) and ds[0]["orig_image"].shape == (3, 20, 30)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_predict_only_datamodule(tmp_path: Path) -> None:
    _write_image(tmp_path / "x.png", 20, 30, 0)
    dm = CocoInstanceDataModule(predict_images=str(tmp_path), image_size=16)
    assert dm.class_names is None  # the task keeps its own vocabulary
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (1, 3, 16, 16) and batch["name"] == ["x.png"]
    with pytest.raises(ValueError, match="no train split"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="predict_images"):
        CocoInstanceDataModule()

