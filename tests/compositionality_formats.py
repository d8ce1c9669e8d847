"""Tiny copies of the compositional benchmarks' released on-disk formats (for tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _png(path: Path, value: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size + 8, 3), value, dtype=np.uint8)
    arr[: size // 2, :, 0] = 255 - value  # not uniform, so crops and resizes are visible
    Image.fromarray(arr).save(path)
    return path


def make_winoground(root: Path, n: int = 3) -> Path:
    tags = ["Object", "Relation", "Both"]
    lines = []
    for i in range(n):
        for j in (0, 1):
            _png(root / "images" / f"ex_{i}_img_{j}.png", 40 * i + 20 * j)
        lines.append(json.dumps({"id": i, "caption_0": f"a mug on a box {i}", "caption_1": f"a box on a mug {i}",
                                 "tag": "x", "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": tags[i % 3],
                                 "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1"}))
    (root / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return root


def make_vg(root: Path, name: str = "relation", n: int = 3) -> Path:
    data = []
    for i in range(n):
        _png(root / "images" / f"{i}.jpg", 30 * i)
        ex = {"image_path": f"{i}.jpg", "bbox_x": 2, "bbox_y": 1, "bbox_w": 16, "bbox_h": 12,
              "true_caption": f"the horse is eating the grass {i}", "false_caption": f"the grass is eating the horse {i}"}
        ex.update({"relation_name": "eating"} if name == "relation" else {"attributes": ["white", "large"]})
        data.append(ex)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"visual_genome_{name}.json").write_text(json.dumps(data))
    return root


def make_coco_order(root: Path) -> Path:
    _png(root / "val2014" / "COCO_val2014_000000000001.jpg", 90)
    (root / "coco_karpathy_test.json").write_text(json.dumps([
        {"image": "val2014/COCO_val2014_000000000001.jpg",
         "caption": ["A small dog runs on the green grass.", "A brown dog plays outside"]}]))
    return root


def make_sugarcrepe(root: Path, subset: str = "swap_att") -> Path:
    _png(root / "val2017" / "000000000139.jpg", 60)
    (root / f"{subset}.json").write_text(json.dumps({
        "0": {"filename": "000000000139.jpg", "caption": "a red car and a blue bike",
              "negative_caption": "a blue car and a red bike"},
        "1": {"filename": "000000000139.jpg", "caption": "a tall man", "negative_caption": "a short man"}}))
    return root


def make_cola(root: Path) -> Path:
    _png(root / "images" / "1.jpg", 10)
    _png(root / "images" / "2.jpg", 200)
    (root / "COLA_multiobjects_matching_benchmark.json").write_text(json.dumps([
        ["https://x/gqa/1.jpg", "round white table and black chair", "https://x/gqa/2.jpg",
         "round black table and white chair"]]))
    return root


def make_eqben(root: Path) -> Path:
    _png(root / "images" / "eqbenag" / "a" / "0.png", 10)
    _png(root / "images" / "eqbenag" / "a" / "1.png", 100)
    arr = np.zeros((20, 20, 3), dtype=np.uint8)
    arr[..., 0] = 255  # BGR: blue
    (root / "images" / "eqbensd" / "b").mkdir(parents=True)
    np.save(root / "images" / "eqbensd" / "b" / "0.npy", arr)
    np.save(root / "images" / "eqbensd" / "b" / "1.npy", arr[..., ::-1].copy())
    (root / "all_select.json").write_text(json.dumps([
        {"image0": "eqbenag/a/0.png", "image1": "eqbenag/a/1.png", "caption0": "a person opens the door",
         "caption1": "a person closes the door"},
        {"image0": "eqbensd/b/0.npy", "image1": "eqbensd/b/1.npy", "caption0": "a blue cat", "caption1": "a red cat"}]))
    return root


def make_clevr(root: Path) -> Path:
    _png(root / "images" / "CLEVR_0.png", 70)
    (root / "captions").mkdir(parents=True)
    for sub in ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape", "spatial",
                "binding_color_shape", "binding_shape_color"):
        (root / "captions" / f"{sub}.json").write_text(json.dumps(
            {"CLEVR_0.png": [[f"{sub} correct", f"{sub} wrong"]]}))
    return root


def make_selfbench(root: Path, model: str = "stable-diffusion-3-medium-diffusers", cfg: str = "9.0") -> Path:
    """Released layout: <root>/<cfg>/<model>/<NNNNN>/{metadata.jsonl, samples/0000k.png}, <root>/../prompts/."""
    colors = ["red", "blue", "green"]
    prompts = {"photo": {
        "colors": {"car": [f"a photo of a {c} car" for c in colors]},
        "position": {"dog": {"cat": [f"a photo of a dog {p} a cat" for p in ("left of", "right of", "above")]}},
        "color_attr": {"car": {"bike": [f"a photo of a {a} car and a {b} bike" for a in colors for b in colors]}},
        "single_object": ["a photo of a car", "a photo of a dog"]}}
    (root.parent / "prompts").mkdir(parents=True, exist_ok=True)
    (root.parent / "prompts" / "zero_shot_prompts.json").write_text(json.dumps(prompts))
    metas = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}],
              "prompt": "a photo of a blue car"},
             {"tag": "position", "include": [{"class": "cat", "count": 1},
                                             {"class": "dog", "count": 1, "position": ["right of", 0]}],
              "prompt": "a photo of a dog right of a cat"},
             {"tag": "color_attr", "include": [{"class": "car", "color": "green"}, {"class": "bike", "color": "red"}],
              "prompt": "a photo of a green car and a red bike"}]
    for i, meta in enumerate(metas):
        d = root / cfg / model / f"{i:05d}"
        for k in range(2):
            _png(d / "samples" / f"{k:05d}.png", 50 * i + k)
        (d / "metadata.jsonl").write_text(json.dumps(meta))
    return root
