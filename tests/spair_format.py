"""A tiny synthetic SPair-71k split in the released on-disk layout (checked against ../shared/fixtures/spair71k).

Layout and quirks: ``PairAnnotation/<split>/<6-digit pair id>-<src stem>-<trg stem>:<category>.json``
(colon in the name, one line of JSON, no trailing newline), ``src_imsize`` = [W, H, 3] width
first, ``kps_ids`` strings, ``*_kps`` int [x, y] of the keypoints visible in both images,
``ImageAnnotation/<category>/<stem>.json`` with ``kps`` = {id string: [x, y] or null}
(SD-DINO sizes its keypoint table from it), ``JPEGImages/<category>/<stem>.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_spair(root: Path, sizes: dict[str, list[tuple[int, int]]], pairs: dict[str, list[tuple[int, int]]],
                n_kps: int = 8, seed: int = 0, split: str = "test") -> Path:
    """Write images of ``sizes[cat]`` ((W, H) each) and the pairs ``pairs[cat]`` (image indices).

    Every image gets ``n_kps`` keypoints at random integer pixels, each visible with
    probability 0.8; a pair keeps the keypoints visible in both (at least 2). Bounding boxes
    are the keypoints' box grown by a few pixels, inside the image. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    pid = 0
    for cat in sorted(sizes):
        stems, kps, boxes = [], [], []
        for i, (w, h) in enumerate(sizes[cat]):
            stem = f"20{10 + i:02d}_{seed:03d}{i:03d}"
            path = root / "JPEGImages" / cat / f"{stem}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            # smooth random colours: a 6x6 grid upsampled, plus noise (features of random models still vary)
            base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
            pix = np.clip(np.asarray(base, np.int16) + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pix).save(path, quality=95)
            pts = np.stack([rng.integers(2, w - 2, n_kps), rng.integers(2, h - 2, n_kps)], 1)
            vis = rng.random(n_kps) < 0.8
            vis[:2] = True
            stems.append(stem)
            kps.append([p.tolist() if v else None for p, v in zip(pts, vis, strict=True)])
            lo, hi = pts[vis].min(0), pts[vis].max(0)
            boxes.append([max(0, int(lo[0]) - 3), max(0, int(lo[1]) - 3), min(w - 1, int(hi[0]) + 3),
                          min(h - 1, int(hi[1]) + 3)])
            ann = root / "ImageAnnotation" / cat / f"{stem}.json"
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text(json.dumps({"filename": f"{stem}.jpg", "image_width": w, "image_height": h, "image_depth": 3,
                                       "category": cat, "bndbox": boxes[-1],
                                       "kps": {str(k): kps[-1][k] for k in range(n_kps)}}))
        for s, t in pairs[cat]:
            pid += 1
            ids = [k for k in range(n_kps) if kps[s][k] is not None and kps[t][k] is not None]
            name = f"{pid:06d}-{stems[s]}-{stems[t]}:{cat}"
            out = root / "PairAnnotation" / split / f"{name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({
                "pair_id": pid, "filename": name, "src_imname": f"{stems[s]}.jpg", "trg_imname": f"{stems[t]}.jpg",
                "src_imsize": [*sizes[cat][s], 3], "trg_imsize": [*sizes[cat][t], 3],
                "src_bndbox": boxes[s], "trg_bndbox": boxes[t], "category": cat,
                "src_pose": "Unspecified", "trg_pose": "Unspecified",
                "src_kps": [kps[s][k] for k in ids], "trg_kps": [kps[t][k] for k in ids],
                "kps_ids": [str(k) for k in ids], "mirror": 0, "viewpoint_variation": 0, "scale_variation": 0,
                "truncation": 0, "occlusion": 0}))
    return root
