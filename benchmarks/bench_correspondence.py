"""Per-image feature cache of the zero-shot correspondence loop: UNet calls saved, on a synthetic SPair-71k split.

DIFT's eval_spair.py featurises each distinct test image once and reuses it for every pair
it is in; without a cache both images of every pair are featurised (2 x 12,234 on the SPair
test split). This writes a synthetic split in SPair-71k's on-disk layout (JPEGImages,
ImageAnnotation, PairAnnotation/test with colon names) to a temp folder, runs
``CorrespondenceTask.test`` on it twice (``feature_cache_mb=0`` = baseline, then the default
cache) with a tiny random backbone, and counts the UNet forward calls and the images they
process with a forward pre-hook. It checks that both runs give the same PCK (noise is seeded
per image, so caching changes the work, not the numbers) and prints the ratio.

    python benchmarks/bench_correspondence.py                       # DIFT (test_sd2, ensemble 2)
    python benchmarks/bench_correspondence.py --method sd_dino      # SD-DINO (test_sd_dinov2, 4 crops per image)
    python benchmarks/bench_correspondence.py --categories 18 --images 30 --pairs 120 --ensemble 8

The counts do not depend on the backbone's size: one call per featurised image (its E copies
and, for SD-DINO, its crops go in one batch), so a tiny model measures the real ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_split(root: Path, categories: int, images: int, pairs: int, seed: int = 0) -> tuple[int, int]:
    """``categories`` x ``images`` JPEGs and ``pairs`` random distinct pairs per category; returns (images, pairs)."""
    rng = np.random.default_rng(seed)
    pid = 0
    for c in range(categories):
        cat = f"category{c:02d}"
        stems = []
        for i in range(images):
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            stem = f"2010_{c:02d}{i:04d}"
            path = root / "JPEGImages" / cat / f"{stem}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
            ann = root / "ImageAnnotation" / cat / f"{stem}.json"
            ann.parent.mkdir(parents=True, exist_ok=True)
            kps = {str(k): [int(rng.integers(0, w)), int(rng.integers(0, h))] for k in range(5)}
            ann.write_text(json.dumps({"filename": f"{stem}.jpg", "image_width": w, "image_height": h, "kps": kps}))
            stems.append((stem, w, h, kps))
        seen: set[tuple[int, int]] = set()
        while len(seen) < min(pairs, images * (images - 1)):
            s, t = (int(v) for v in rng.choice(images, 2, replace=False))
            if (s, t) in seen:
                continue
            seen.add((s, t))
            pid += 1
            (ss, sw, sh, sk), (ts, tw, th, tk) = stems[s], stems[t]
            name = f"{pid:06d}-{ss}-{ts}:{cat}"
            out = root / "PairAnnotation" / "test" / f"{name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({
                "pair_id": pid, "filename": name, "src_imname": f"{ss}.jpg", "trg_imname": f"{ts}.jpg",
                "src_imsize": [sw, sh, 3], "trg_imsize": [tw, th, 3], "src_bndbox": [0, 0, sw - 1, sh - 1],
                "trg_bndbox": [0, 0, tw - 1, th - 1], "category": cat, "src_kps": list(sk.values()),
                "trg_kps": list(tk.values()), "kps_ids": list(sk), "mirror": 0}))
    return categories * images, pid


def run(root: Path, method: str, cache_mb: float, ensemble: int) -> dict:
    """One test epoch; UNet calls and images counted with a forward pre-hook."""
    from lightning.pytorch import Trainer

    from diffperc.data.correspondence import CorrespondenceDataModule
    from diffperc.tasks.correspondence import CorrespondenceTask

    if method == "dift":
        task = CorrespondenceTask("test_sd2", {"layers": "dift", "timestep": 261, "ensemble_size": ensemble,
                                               "latent_sample": "sample"}, feature_cache_mb=cache_mb)
        dm = CorrespondenceDataModule("spair", str(root), image_size=32, batch_size=4)
    else:
        task = CorrespondenceTask("test_sd_dinov2", {"sd_window": 64, "shared_noise_seed": 42, "weights": [1.0, 1.0]},
                                  method="sd_dino", prompt="a photo of {category}", pca_dims=[8, 8, 4],
                                  feature_cache_mb=cache_mb)
        dm = CorrespondenceDataModule("spair", str(root), image_size=112, letterbox=True, dino_image_size=112)
    unet = task.backbone.unet if method == "dift" else task.backbone.sd.unet
    count = {"calls": 0, "items": 0}

    def pre(module, args, kwargs) -> None:
        count["calls"] += 1
        count["items"] += (args[0] if args else kwargs["sample"]).shape[0]

    hook = unet.register_forward_pre_hook(pre, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, default_root_dir=str(root.parent)).test(task, datamodule=dm, verbose=False)
    finally:
        hook.remove()
    return {**count, "seconds": time.perf_counter() - t0, "results": task.results, "featurised": task.featurised}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["dift", "sd_dino"], default="dift")
    parser.add_argument("--categories", type=int, default=3)
    parser.add_argument("--images", type=int, default=6, help="images per category")
    parser.add_argument("--pairs", type=int, default=12, help="pairs per category (distinct ordered image pairs)")
    parser.add_argument("--ensemble", type=int, default=2, help="DIFT ensemble size (DIFT: 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "SPair-71k"
        n_images, n_pairs = write_split(root, args.categories, args.images, args.pairs)
        base, cached = run(root, args.method, 0, args.ensemble), run(root, args.method, 4096, args.ensemble)
    same = base["results"] == cached["results"]
    print(f"synthetic SPair-71k test split: {args.categories} categories, {n_images} images, {n_pairs} pairs; "
          f"method {args.method}")
    print(f"{'run':<22}{'featurised':>11}{'UNet calls':>12}{'UNet images':>13}{'seconds':>10}{'PCK@0.1 kpt':>13}")
    for name, r in (("no cache (baseline)", base), ("per-image cache", cached)):
        print(f"{name:<22}{r['featurised']:>11}{r['calls']:>12}{r['items']:>13}{r['seconds']:>10.1f}"
              f"{r['results']['pck@0.1/per_keypoint'] * 100:>13.2f}")
    print(f"UNet calls saved: {base['calls'] / cached['calls']:.2f}x fewer ({base['calls']} -> {cached['calls']}; "
          f"2 x {n_pairs} pairs vs {cached['featurised']} distinct images); time {base['seconds'] / cached['seconds']:.2f}x; "
          f"same PCK: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit("the cached run changed the PCK numbers")


if __name__ == "__main__":
    main()
