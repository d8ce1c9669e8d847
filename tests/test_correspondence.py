"""Semantic correspondence: DIFT matching vs brute force, PCK, SPair-71k / PF-Pascal loaders on tiny fake
copies in the real formats, the CorrespondenceTask on test_sd, the YAML configs, ``diffperc correspond``."""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from PIL import Image

from diffperc.backbones.registry import create_backbone
from diffperc.data.correspondence import (
    CorrespondenceDataModule,
    PFPascalDataset,
    SPairDataset,
    collate_pairs,
)
from diffperc.tasks.correspondence import CorrespondenceTask
from diffperc.zeroshot import correspond_cli
from diffperc.zeroshot.correspondence import (
    PCKTally,
    from_frame,
    match_patches,
    match_points,
    mutual_nn,
    pck,
    pck_correct,
    pck_threshold,
    sd_dino_descriptors,
    to_frame,
    upsampled_rows,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "correspondence").glob("*.yaml"))



# ---------------------------------------------------------------------------- matching
def _brute_sims(fs, ft, pts, size_s, size_t):
    """Independent DIFT: full F.interpolate of both maps, full (N, H'W') cosine matrix."""
    up_s = F.interpolate(fs[None], size=size_s, mode="bilinear", align_corners=False)[0]
    up_t = F.interpolate(ft[None], size=size_t, mode="bilinear", align_corners=False)[0]
    xs = torch.floor(pts[:, 0] + 0.5).long().clamp(0, size_s[1] - 1)
    ys = torch.floor(pts[:, 1] + 0.5).long().clamp(0, size_s[0] - 1)
    return F.normalize(up_s[:, ys, xs].T, dim=1) @ F.normalize(up_t.flatten(1), dim=0)  # (N, H'W')


@pytest.mark.parametrize("seed", range(6))
def test_match_points_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    fs, ft = torch.randn(8, 5, 7, generator=gen), torch.randn(8, 6, 4, generator=gen)
    size_s, size_t = (37, 51), (29, 44)  # non-square, non-integer scales
    pts = torch.rand(16, 2, generator=gen) * torch.tensor([51.0, 37.0])
    sims = _brute_sims(fs, ft, pts, size_s, size_t)
    for chunk in (1, 2**30):  # one row per chunk, and everything at once
        got = match_points(fs, ft, pts, size_s, size_t, chunk_bytes=chunk)
        flat = (got[:, 1] * size_t[1] + got[:, 0]).long()
        best, arg = sims.max(1)
        top2 = sims.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-6
        assert torch.equal(flat[clear], arg[clear])  # a clear winner: the same pixel
        # pixels tied in exact arithmetic (clamped borders repeat a feature) differ by rounding: still a maximiser
        assert torch.all(sims.gather(1, flat[:, None])[:, 0] >= best - 1e-6)
        assert clear.sum() >= 4, clear.sum()


def test_chunked_equals_unchunked():
    fs, ft = torch.randn(16, 9, 12), torch.randn(16, 11, 8)
    pts = torch.rand(20, 2) * torch.tensor([95.0, 70.0])
    full = match_points(fs, ft, pts, (70, 95), (83, 61), chunk_bytes=2**30)
    for chunk in (1, 5000, 200_000):
        assert torch.equal(match_points(fs, ft, pts, (70, 95), (83, 61), chunk_bytes=chunk), full)


def test_upsampled_rows_are_f_interpolate():
    f = torch.randn(5, 6, 9)
    ref = F.interpolate(f[None], size=(41, 30), mode="bilinear", align_corners=False)[0]
    rows = torch.tensor([0, 7, 20, 40])
    torch.testing.assert_close(upsampled_rows(f, rows, (41, 30)), ref[:, rows], atol=1e-5, rtol=1e-5)


def test_shifted_copy_gives_the_exact_shift():
    r, (dy, dx) = 16, (2, 3)  # 16 px per feature cell, target = source moved down 2 and right 3 cells
    src = torch.randn(32, 8, 10)
    trg = torch.randn(32, 8, 10)
    trg[:, dy:, dx:] = src[:, : 8 - dy, : 10 - dx]
    size = (8 * r, 10 * r)
    pts = torch.tensor([[20.0, 24.0], [60.3, 40.7], [100.0, 70.0], [33.0, 50.0], [90.5, 60.4]])  # interior, (x, y)
    got = match_points(src, trg, pts, size, size, chunk_bytes=4096)
    expected = torch.floor(pts + 0.5) + torch.tensor([dx * r, dy * r], dtype=torch.float32)
    assert torch.equal(got, expected)
    assert mutual_nn(src, trg, pts, got, size, size).all()
    soft = match_points(src, trg, pts, size, size, soft_window=2, soft_temperature=1e-4)
    assert (soft - expected).abs().max() < 0.5  # window soft-argmax stays at a sharp peak


def test_sd_dino_descriptors_shapes_norms_and_chain():
    sd_s = [torch.randn(16, 2, 2), torch.randn(16, 4, 4), torch.randn(8, 8, 8)]
    sd_t = [torch.randn(16, 2, 2), torch.randn(16, 4, 4), torch.randn(8, 8, 8)]
    dino_s, dino_t = torch.randn(32, 8, 8), torch.randn(32, 8, 8)
    torch.manual_seed(0)
    ds, dt = sd_dino_descriptors(sd_s, sd_t, dino_s, dino_t, pca_dims=[4, 3, 2])
    assert ds.shape == dt.shape == (2 + 3 + 4 + 32, 8, 8)  # channels [s3, s4, s5, dino]
    torch.testing.assert_close(ds[:9].norm(dim=0), torch.ones(8, 8))  # SD-DINO's code weights: 1 and 1
    torch.testing.assert_close(dt[9:], F.normalize(dino_t, dim=0))
    half = sd_dino_descriptors(sd_s, sd_t, dino_s, dino_t, pca_dims=[4, 3, 2], weights=(0.5, 0.5))[0]
    torch.testing.assert_close(half[9:].norm(dim=0), torch.full((8, 8), 0.5))
    # independent chain: PCA by hand (same RNG draws), s5 -> s4 grid, then -> s3 grid, two bilinear steps
    torch.manual_seed(0)
    red = []
    for a, b, q in zip(sd_s, sd_t, [4, 3, 2], strict=True):
        x = torch.cat([a.flatten(1), b.flatten(1)], 1).T
        x = x - x.mean(0, keepdim=True)
        red.append((x @ torch.pca_lowrank(x, q=q)[2][:, :q]).T[:, : a[0].numel()].reshape(q, *a.shape[1:]))
    s5_4 = F.interpolate(red[0][None], size=(4, 4), mode="bilinear", align_corners=False)[0]
    s54_3 = F.interpolate(torch.cat([red[1], s5_4])[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    sd = torch.cat([red[2], s54_3])
    torch.testing.assert_close(ds[:9], sd / sd.norm(dim=0, keepdim=True), rtol=1e-5, atol=1e-6)
    one_step = F.interpolate(red[0][None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert not torch.allclose(s54_3[3:], one_step, atol=1e-3)  # the two-step chain is not one resize


def test_match_patches_is_the_nearest_patch_centre():
    gen = torch.Generator().manual_seed(0)
    src, trg = torch.randn(6, 5, 4, generator=gen), torch.randn(6, 5, 4, generator=gen)  # a 5x4 grid of 14 px patches
    trg[:, 3, 1] = src[:, 1, 2] + 1e-3  # the patch under (x, y) = (30, 20) has a near twin at row 3, column 1
    pts = torch.tensor([[30.0, 20.0], [0.0, 0.0], [55.9, 69.9], [41.99, 14.0]])
    got = match_patches(src, trg, pts, (70, 56))
    assert got[0].tolist() == [1 * 14 + 6.5, 3 * 14 + 6.5]  # p * 14 + 14 // 2 - 0.5
    for p, g in zip(pts, got, strict=True):  # brute force: L2 over all target patches from trunc(g / H * y), trunc(g / W * x)
        cell = src[:, int(p[1] * 5 / 70), int(p[0] * 4 / 56)]
        d = (trg.flatten(1) - cell[:, None]).norm(dim=0)
        best = int(d.argmin())
        assert g.tolist() == [best % 4 * 14 + 6.5, best // 4 * 14 + 6.5]
    cos = match_patches(src, trg * torch.rand(1, 5, 4, generator=gen) * 5, pts, (70, 56), distance="cos")
    assert cos[0].tolist() == got[0].tolist()  # cosine ignores the target norms
    with pytest.raises(ValueError, match="grid times one patch side"):
        match_patches(src, trg, pts, (70, 50))
    with pytest.raises(ValueError, match="distance must be"):
        match_patches(src, trg, pts, (70, 56), distance="l1")


def test_frames_round_trip():
    pts = torch.tensor([[0.0, 0.0], [299.0, 199.0], [12.5, 3.25]])
    frame = (2.8, 2.8, 0.0, 140.0)  # 300x200 letterboxed into 840: scale 2.8, 140 px top padding
    inside = to_frame(pts, frame)
    assert inside[1].tolist() == [pytest.approx(837.2, abs=1e-4), pytest.approx(697.2, abs=1e-4)]
    torch.testing.assert_close(from_frame(inside, frame), pts)


def test_match_points_bad_input():
    f = torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match=r"points_src has 1 point\(s\) outside the 10x12"):
        match_points(f, f, torch.tensor([[5.0, 5.0], [13.0, 2.0]]), (10, 12), (10, 12))
    with pytest.raises(ValueError, match="points_src must be"):
        match_points(f, f, torch.tensor([5.0, 5.0]), (10, 12), (10, 12))
    with pytest.raises(ValueError, match="same channels"):
        match_points(f, torch.randn(5, 3, 3), torch.zeros(1, 2), (10, 12), (10, 12))
    with pytest.raises(ValueError, match="feat_src must be one image's feature map"):
        match_points(f[None], f, torch.zeros(1, 2), (10, 12), (10, 12))
    with pytest.raises(ValueError, match="size_trg must be an image size"):
        match_points(f, f, torch.zeros(1, 2), (10, 12), (10,))


# ---------------------------------------------------------------------------- PCK
def test_pck_per_keypoint_vs_per_image_and_references():
    gt_a = torch.tensor([[50.0, 20.0]] * 4)
    pred_a = gt_a + torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [12.0, 16.0]])  # errors 0, 5, 10, 20
    bbox = torch.tensor([10.0, 5.0, 110.0, 55.0])  # 100 x 50 -> side 100 -> 10 px at alpha 0.1
    assert pck_threshold(bbox) == 100 and pck_threshold((200, 120)) == 200
    assert pck_correct(pred_a, gt_a, bbox, 0.1).tolist() == [True, True, True, False]  # DIFT: <= is correct
    assert pck_correct(pred_a, gt_a, bbox, 0.1, rule="sd_dino").tolist() == [True, True, True, False]
    edge = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 40.0]])  # error 40, side 80: exactly 0.5 x side
    assert pck_correct(*edge, 80.0, 0.5).item() and not pck_correct(*edge, 80.0, 0.5, rule="sd_dino").item()
    edge = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 8.0]])  # 8 vs float32(0.1) x 80 = 8.0000001: correct
    assert pck_correct(*edge, 80.0, 0.1, rule="sd_dino").item()
    assert pck(pred_a, gt_a, bbox, 0.1) == 0.75
    assert pck(pred_a, gt_a, (200, 120), 0.1) == 1.0  # image size (H, W): side 200 -> 20 px
    assert pck(pred_a, gt_a, bbox, 0.05) == 0.5
    tally = PCKTally((0.1, 0.05))
    tally.update(pred_a, gt_a, bbox, "cat")
    tally.update(torch.tensor([[0.0, 30.0]]), torch.tensor([[0.0, 0.0]]), bbox, "dog")  # error 30: wrong
    res = tally.compute()
    assert res["pck@0.1/per_keypoint"] == pytest.approx(3 / 5)
    assert res["pck@0.1/per_image"] == pytest.approx((0.75 + 0.0) / 2)
    assert res["cat/pck@0.1/per_image"] == 0.75 and res["dog/pck@0.05/per_keypoint"] == 0.0
    assert "60.00" in tally.table() and "37.50" in tally.table()
    tally.update(gt_a[:2], gt_a[:2], bbox, "cat")  # a second cat pair, both right: cat 5/6 per keypoint, dog 0/1
    res = tally.compute()
    assert res["pck@0.1/per_category_kpt"] == pytest.approx((5 / 6 + 0) / 2)  # SD-DINO's "Average"
    assert res["pck@0.1/per_category_kpt_weighted"] == pytest.approx((2 * 5 / 6 + 1 * 0) / 3)  # its "Weighted"
    assert "cat. weighted" in tally.table() and f"{100 * 5 / 9:.2f}" in tally.table()
    with pytest.raises(ValueError, match="x2 >= x1"):
        pck_threshold([10, 0, 5, 10])
    with pytest.raises(ValueError, match=r"pred and gt must both be \(N, 2\)"):
        pck_correct(pred_a, gt_a[:2], bbox)


# ---------------------------------------------------------------------------- fake datasets
def _jpeg(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def make_spair(root: Path, trg_kps: list | None = None) -> Path:
    """Two test pairs and one trn pair in SPair-71k's layout: colon names, one-line JSON, [W, H, 3] sizes."""
    sizes = {"2008_000001": (60, 40), "2008_000002": (48, 64), "2009_000003": (50, 50)}
    cats = {"2008_000001": "aeroplane", "2008_000002": "aeroplane", "2009_000003": "cat"}
    for i, (stem, (w, h)) in enumerate(sizes.items()):
        _jpeg(root / "JPEGImages" / cats[stem] / f"{stem}.jpg", w, h, i)
        ann = root / "ImageAnnotation" / cats[stem] / f"{stem}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps({"filename": f"{stem}.jpg", "image_width": w, "image_height": h, "kps": {}}))
    pairs = [("test", 1, "2008_000001", "2008_000002", [[5, 6], [30, 20], [59, 39]], trg_kps or [[4, 4], [24, 50], [47, 63]],
              ["0", "7", "11"]),
             ("test", 2, "2009_000003", "2009_000003", [[10, 10], [40, 45]], [[12, 11], [38, 44]], ["2", "3"]),
             ("trn", 1, "2008_000002", "2008_000001", [[4, 4]], [[5, 6]], ["0"])]
    for split, pid, s, t, sk, tk, ids in pairs:
        name = f"{pid:06d}-{s}-{t}:{cats[s]}"
        d = root / "PairAnnotation" / split
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(json.dumps({
            "pair_id": pid, "filename": name, "src_imname": f"{s}.jpg", "trg_imname": f"{t}.jpg",
            "src_imsize": [*sizes[s], 3], "trg_imsize": [*sizes[t], 3], "src_bndbox": [2, 3, 58, 38],
            "trg_bndbox": [1, 2, 45, 60], "category": cats[s], "src_pose": "Left", "trg_pose": "Left",
            "src_kps": sk, "trg_kps": tk, "kps_ids": ids, "mirror": 0, "viewpoint_variation": 0,
            "scale_variation": 0, "truncation": 0, "occlusion": 0}))  # one line, no trailing newline
    return root


def test_spair_loader_reads_the_real_format(tmp_path):
    ds = SPairDataset(make_spair(tmp_path / "SPair-71k"), "test", image_size=32)
    assert len(ds) == 2 and ds.categories == ["aeroplane", "cat"]
    it = ds[0]
    assert it["name"] == "000001-2008_000001-2008_000002:aeroplane" and it["category"] == "aeroplane"
    assert it["src_size"].tolist() == [40, 60] and it["trg_size"].tolist() == [64, 48]  # (H, W) from [W, H, 3]
    assert it["src_image"].shape == it["trg_image"].shape == (3, 32, 32)
    assert it["kps_ids"].tolist() == [0, 7, 11]
    assert it["src_kps_orig"].tolist() == [[5, 6], [30, 20], [59, 39]]
    torch.testing.assert_close(it["src_kps"], torch.tensor([[5, 6], [30, 20], [59, 39]]) * torch.tensor([32 / 60, 32 / 40]))
    torch.testing.assert_close(it["trg_bbox"], torch.tensor([1, 2, 45, 60]) * torch.tensor([32 / 48, 32 / 64] * 2))
    assert it["pck_ref"].tolist() == [1, 2, 45, 60]  # the target bbox in original pixels
    assert len(SPairDataset(tmp_path / "SPair-71k", "train", image_size=32)) == 1  # 'train' -> trn/
    assert len(SPairDataset(tmp_path / "SPair-71k", "test", categories=["cat"])) == 1
    batch = collate_pairs([ds[0], ds[1]])
    assert batch["src_kps"].shape == (2, 3, 2) and batch["kps_valid"].tolist() == [[True] * 3, [True, True, False]]
    assert batch["kps_ids"][1].tolist() == [2, 3, -1] and batch["category"] == ["aeroplane", "cat"]


def test_spair_letterbox_views_frames_ids_and_sampling(tmp_path):
    root = make_spair(tmp_path / "SPair-71k")
    ds = SPairDataset(root, "test", image_size=48, letterbox=True, dino_image_size=56)
    it = ds[0]  # src 60x40 (W x H), trg 48x64
    assert it["src_image"].shape == (3, 48, 48) and it["src_image_dino"].shape == (3, 56, 56)
    assert it["src_frame"].tolist() == [0.8, 0.8, 0.0, 8.0]  # 48 / 60; height round(32): (48 - 32) // 2 on top
    assert it["trg_frame"].tolist() == [0.75, 0.75, 6.0, 0.0]  # 48 / 64; width 36: 6 on the left
    assert it["src_frame_dino"].tolist() == [56 / 60, 56 / 60, 0.0, 9.0]  # height round(37.33) = 37 -> 9
    assert it["src_image"][:, :8].max() == 0 and it["src_image"][:, 40:].max() == 0  # black padding
    assert it["src_image"][:, 8:40].mean() > 0.2
    torch.testing.assert_close(it["src_kps"], it["src_kps_orig"] * 0.8 + torch.tensor([0.0, 8.0]))
    assert it["src_id"] == str(root / "JPEGImages" / "aeroplane" / "2008_000001.jpg")
    batch = collate_pairs([ds[0], ds[1]])
    assert batch["trg_frame_dino"].shape == (2, 4) and batch["src_id"][1].endswith("2009_000003.jpg")
    # pairs come by category then name; SD-DINO's --SAMPLE k draw: np.random.seed(42), choice(n, k) per category
    more = make_spair(tmp_path / "more")
    for k in range(4):  # three more aeroplane pairs, named to sort before and after the first one
        src = more / "PairAnnotation" / "test" / "000001-2008_000001-2008_000002:aeroplane.json"
        (src.parent / f"00000{k}-2008_00000{k}-x:aeroplane.json").write_text(src.read_text())
    names = [r["name"] for r in SPairDataset(more, "test").records]
    assert names == sorted(names[:-1]) + ["000002-2009_000003-2009_000003:cat"]
    drawn = SPairDataset(more, "test", sample_per_category=3).records
    np.random.seed(42)
    want = [sorted(names[:-1])[i] for i in np.random.choice(len(names) - 1, 3)]
    np.random.seed(42)
    want += [names[-1] for _ in np.random.choice(1, 3)]
    assert [r["name"] for r in drawn] == want
    with pytest.raises(ValueError, match="square image_size"):
        SPairDataset(root, "test", image_size=(48, 32), letterbox=True)
    with pytest.raises(ValueError, match="sample_per_category must be >= 1"):
        SPairDataset(root, "test", sample_per_category=0)
    with pytest.raises(ValueError, match="PF-Pascal uses all pairs"):
        CorrespondenceDataModule("pf_pascal", str(root), sample_per_category=5).make_dataset("test")


def make_pf_pascal(root: Path, crlf: bool = False) -> Path:
    """PF-Pascal as NCNet ships it: CSV paths prefixed PF-dataset-PASCAL/JPEGImages/, 1-based classes,
    semicolon keypoint lists (test); a val list without keypoints + Annotations/<class>/<name>.mat."""
    from scipy.io import savemat

    sizes = {"2010_000001": (60, 40), "2010_000002": (48, 64), "2011_000003": (50, 50)}
    for i, (stem, (w, h)) in enumerate(sizes.items()):
        _jpeg(root / "JPEGImages" / f"{stem}.jpg", w, h, i)
    pre = "PF-dataset-PASCAL/JPEGImages/"
    nl = "\r\n" if crlf else "\n"
    rows = ["source_image,target_image,class,XA,YA,XB,YB",
            f"{pre}2010_000001.jpg,{pre}2010_000002.jpg,1,5.5;30.25;59,6;20;39.5,4;24;47,4;50;63",
            f"{pre}2011_000003.jpg,{pre}2011_000003.jpg,20,10;40,10;45,12;38,11;44"]
    (root / "test_pairs.csv").write_text(nl.join(rows) + nl)
    (root / "val_pairs.csv").write_text(nl.join(["source_image,target_image,class,flip",
                                                 f"{pre}2010_000001.jpg,{pre}2010_000002.jpg,8,0"]) + nl)
    nan = float("nan")
    for stem, kps in {"2010_000001": [[5, 6], [nan, nan], [30, 20], [59, 39]],
                      "2010_000002": [[4, 4], [10, 10], [nan, nan], [47, 63]]}.items():
        (root / "Annotations" / "cat").mkdir(parents=True, exist_ok=True)
        savemat(root / "Annotations" / "cat" / f"{stem}.mat", {"kps": np.array(kps), "bbox": np.array([[1, 2, 40, 30]])})
    return root


@pytest.mark.parametrize("crlf", [False, True])
def test_pf_pascal_loader_reads_the_real_format(tmp_path, crlf):
    root = make_pf_pascal(tmp_path / "PF-PASCAL", crlf)
    ds = PFPascalDataset(root, "test", image_size=32)
    assert [r["category"] for r in ds.records] == ["aeroplane", "tvmonitor"]  # classes 1 and 20, 1-based
    it = ds[0]
    assert it["src_kps_orig"].tolist() == [[5.5, 6], [30.25, 20], [59, 39.5]]
    assert it["trg_kps_orig"].tolist() == [[4, 4], [24, 50], [47, 63]]
    assert it["pck_ref"].tolist() == [0, 0, 48, 64]  # target image size as a box: side max(H, W)
    assert it["kps_ids"].tolist() == [-1, -1, -1]
    val = PFPascalDataset(root, "val", image_size=32)[0]  # keypoints from the .mat files, NaN rows dropped
    assert val["category"] == "cat" and val["src_kps_orig"].tolist() == [[5, 6], [59, 39]]
    assert val["trg_kps_orig"].tolist() == [[4, 4], [47, 63]]


def test_loader_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SPair-71k root .*nowhere does not exist.*PairAnnotation"):
        SPairDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"PF-Pascal root .*nowhere does not exist.*JPEGImages"):
        PFPascalDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no pair annotations in .*PairAnnotation.val"):
        SPairDataset(make_spair(tmp_path / "s"), "val")
    bad = SPairDataset(make_spair(tmp_path / "b", trg_kps=[[4, 4], [24, 70], [47, 63]]), "test", image_size=32)
    with pytest.raises(ValueError, match=r"000001-2008_000001-2008_000002:aeroplane.*trg keypoints.*outside the 64x48"):
        bad[0]
    ds = SPairDataset(tmp_path / "s", "test", image_size=None)
    with pytest.raises(ValueError, match="images of different sizes in one batch"):
        collate_pairs([ds[0], ds[1]])
    (tmp_path / "s" / "JPEGImages" / "cat" / "2009_000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2009_000003.jpg does not exist"):
        ds[1]


# ---------------------------------------------------------------------------- task
def _trainer(tmp_path: Path) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, fast_dev_run=1)


def test_task_dift_on_test_sd_matches_an_independent_run(tmp_path):
    root = make_spair(tmp_path / "SPair-71k")
    task = CorrespondenceTask("test_sd", {"layers": "dift", "ensemble_size": 2}, save_matches=2,
                              output_dir=str(tmp_path / "out"))
    dm = CorrespondenceDataModule("spair", str(root), image_size=32, batch_size=2)
    _trainer(tmp_path).test(task, datamodule=dm)
    res = task.results
    assert set(res) >= {"pck@0.1/per_image", "pck@0.05/per_keypoint", "cat/pck@0.01/per_image",
                        "pck@0.1/per_category_kpt_weighted"}
    assert (task.featurised, task.cache.hits) == (3, 1)  # 3 distinct images; the self-pair's second image is a hit
    # independent: same backbone, each image's noise seeded by crc32 of its path, brute-force matching, PCK by hand
    bb = create_backbone("test_sd", layers="dift", ensemble_size=2)
    batch = collate_pairs([dm.datasets["test"][i] for i in range(2)])
    fracs = []
    for i in range(2):
        feats = []
        for side in ("src", "trg"):
            gen = torch.Generator().manual_seed(zlib.crc32(batch[f"{side}_id"][i].encode()))
            feats.append(bb(batch[f"{side}_image"][i : i + 1], prompts=[f"a photo of a {batch['category'][i]}"],
                            generator=gen).features[0][0])
        n = int(batch["kps_valid"][i].sum())
        sims = _brute_sims(feats[0], feats[1], batch["src_kps_orig"][i][:n], batch["src_size"][i].tolist(),
                           batch["trg_size"][i].tolist())
        w = int(batch["trg_size"][i][1])
        pred = torch.stack([sims.argmax(1) % w, sims.argmax(1) // w], 1).float()
        fracs.append(pck(pred, batch["trg_kps_orig"][i][:n], batch["pck_ref"][i], 0.1))
    assert res["pck@0.1/per_image"] == pytest.approx(sum(fracs) / 2)
    pngs = sorted((tmp_path / "out" / "matches").glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size[0] > 64
    assert json.loads((tmp_path / "out" / "pck.json").read_text())["pairs"] == 2
    # the cache changes nothing but the work: the same numbers without it
    nocache = CorrespondenceTask("test_sd", {"layers": "dift", "ensemble_size": 2}, feature_cache_mb=0)
    _trainer(tmp_path).test(nocache, datamodule=CorrespondenceDataModule("spair", str(root), image_size=32,
                                                                         batch_size=2))
    assert nocache.results == res
    assert nocache.featurised == 4 and nocache.cache.hits == 0  # both images of both pairs


def test_task_sd_dino_and_bad_arguments(tmp_path):
    root = make_spair(tmp_path / "SPair-71k")
    task = CorrespondenceTask("test_sd_dinov2", {"dino_size": 28}, method="sd_dino", pca_dims=4)
    _trainer(tmp_path).test(task, datamodule=CorrespondenceDataModule("spair", str(root), image_size=32))
    assert 0 <= task.results["pck@0.1/per_keypoint"] <= 1
    with pytest.raises(ValueError, match="needs a fused SD \\+ DINOv2 backbone"):
        CorrespondenceTask("test_sd", method="sd_dino")
    with pytest.raises(ValueError, match="placeholder \\{category\\}"):
        CorrespondenceTask("test_sd", prompt="a photo of a {}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_configs_print_and_run_on_test_sd(config, tmp_path, capsys, monkeypatch):
    from diffperc.cli import cli_main

    monkeypatch.setattr("sys.argv", ["diffperc"])
    with pytest.raises(SystemExit) as exc:
        cli_main(["test", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    assert "class_path: diffperc.tasks.correspondence.CorrespondenceTask" in capsys.readouterr().out
    tiny = {"spair_dift_sd21.yaml": ["--model.init_args.backbone=test_sd"],
            "spair_dift_sdxl.yaml": ["--model.init_args.backbone=test_sdxl"],
            "spair_ditf_flux.yaml": ["--model.init_args.backbone=test_flux",
                                     '--model.init_args.backbone_kwargs={"ditf": true, "ditf_block": 3, '
                                     '"massive_channels": [3, 7], "ensemble_size": 2, "latent_sample": "sample", '
                                     '"max_sequence_length": 16}'],
            "spair_sddino_sd15.yaml": ["--model.init_args.backbone=test_sd_dinov2",
                                       '--model.init_args.backbone_kwargs={"sd_window": 32, "shared_noise_seed": 42}',
                                       "--model.init_args.pca_dims=4", "--data.init_args.dino_image_size=56"]}[config.name]
    cli = cli_main(["test", "--config", str(config), *tiny, f"--data.init_args.root={make_spair(tmp_path / 'sp')}",
                    "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--trainer.fast_dev_run=1",
                    "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
                    f"--model.init_args.output_dir={tmp_path / 'out'}"])
    assert "pck@0.1/per_image" in cli.model.results and (tmp_path / "out" / "pck.json").is_file()


# ---------------------------------------------------------------------------- diffperc correspond
def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffperc")
    correspond_cli.add_parser(parser.add_subparsers(dest="command"))
    return correspond_cli.run(parser.parse_args(["correspond", *argv]))


def test_correspond_cli_writes_a_png(tmp_path, capsys):
    _jpeg(tmp_path / "a.jpg", 60, 40, 0)
    _jpeg(tmp_path / "b.jpg", 48, 64, 1)
    out = tmp_path / "match.png"
    base = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--model", "test_sd", "--size", "32", "--out", str(out)]
    assert _run_cli([*base, "--points", "5,6;30,20;59.5,39"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("0: (5.0, 6.0) -> (") and lines[-1] == str(out)
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG" and img.height >= 40 and img.width > 60 + 48
    assert _run_cli([*base, "--grid", "3"]) == 0  # no points: a grid on the foreground
    assert 3 <= len(capsys.readouterr().out.strip().splitlines()) - 1 <= 9
    fused = [*base[:2], "--model", "test_sd_dinov2", "--out", str(tmp_path / "fused.png"), "--points", "5,6"]
    assert _run_cli(fused) == 0 and (tmp_path / "fused.png").is_file()  # SD + DINOv2 preset, native size
    assert _run_cli([*base, "--points", "70,6"]) == 1
    assert "outside the 40x60" in capsys.readouterr().err
    assert _run_cli([*base, "--points", "5;6"]) == 1
    assert "'x,y;x,y'" in capsys.readouterr().err
    assert _run_cli([str(tmp_path / "missing.jpg"), *base[1:]]) == 1
    assert "SRC image" in capsys.readouterr().err


def test_foreground_grid_keeps_the_object():
    feat = torch.zeros(4, 12, 12)
    feat[0] = 1.0  # background direction
    feat[:, 4:8, 4:8] = torch.tensor([0.0, 1.0, 0.0, 0.0])[:, None, None]  # object in the centre
    pts = correspond_cli.foreground_grid(feat, (120, 120), grid=6)
    assert len(pts) == 4 and ((pts > 40) & (pts < 80)).all()
