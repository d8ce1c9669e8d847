"""Tiny copies of the camouflage datasets' on-disk formats (COCO instance JSON + images), for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros), written independently."""
    flat = mask.T.flatten()
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _write_image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def write_coco(json_path: Path, image_dir: Path, categories: list[str], with_crowd: bool = True) -> dict:
    """Two annotated images (polygon + RLE instances, a crowd region) and one without instances."""
    images = [{"id": 3, "file_name": "cam_b.jpg", "height": 40, "width": 60},
              {"id": 1, "file_name": "cam_a.jpg", "height": 48, "width": 32},
              {"id": 7, "file_name": "empty.jpg", "height": 16, "width": 16}]
    for i, im in enumerate(images):
        _write_image(image_dir / im["file_name"], im["height"], im["width"], i)
    rle_mask = np.zeros((40, 60), np.uint8)
    rle_mask[5:15, 20:50] = 1
    crowd = np.zeros((40, 60), np.uint8)
    crowd[30:35, 0:10] = 1
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 200.0, "bbox": [4, 4, 10, 20],
             "segmentation": [[4.0, 4.0, 14.0, 4.0, 14.0, 24.0, 4.0, 24.0]]},
            {"id": 2, "image_id": 3, "category_id": len(categories), "iscrowd": 0, "area": 300.0, "bbox": [20, 5, 30, 10],
             "segmentation": _uncompressed_rle(rle_mask)}]
    if with_crowd:
        anns.append({"id": 3, "image_id": 3, "category_id": 1, "iscrowd": 1, "area": 50.0, "bbox": [0, 30, 10, 5],
                     "segmentation": _uncompressed_rle(crowd)})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": n, "supercategory": "animal"} for i, n in enumerate(categories)]}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data))
    return {"rle_mask": rle_mask, "crowd": crowd}


def make_cod10k(root: Path, nc4k: bool = True) -> dict:
    """OSFormer's layout: COD10K-v3/annotations/{train_instance,test2026}.json, NC4K/nc4k_test.json."""
    cod = root / "COD10K-v3"
    info = write_coco(cod / "annotations" / "train_instance.json", cod / "Train" / "Image", ["foreground"])
    write_coco(cod / "annotations" / "test2026.json", cod / "Test" / "Image", ["foreground"])
    if nc4k:
        write_coco(root / "NC4K" / "nc4k_test.json", root / "NC4K" / "Imgs", ["foreground"], with_crowd=False)
    return info
