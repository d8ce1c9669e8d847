"""OVDiff cost: time per class (support sampling, masks, prototypes), per test image, and growth with classes.

Support-set sampling and prototype building dominate OVDiff (released: 32 images x 30 DPM-Solver
steps x 2 for guidance, per class). This prints, in one run on one model:

1. sampling one class's support set batched (``sample_batch_size`` = N, one pipeline call) against
   the baseline of one image per call;
2. masks and prototypes of that class, and ``prepare`` again from the cache (the cost of a class
   the second time);
3. seconds per test image (sliding crops + the whole image, the SD extractor);
4. how ``prepare`` and a test image grow with the vocabulary size C: ``prepare`` measured on a
   growing vocabulary (each class is a new support set), the test image on prototype banks of C
   classes (the per-class scoring term).

    python benchmarks/bench_ovseg.py                   # bundled digits model, N=4, 30 steps
    python benchmarks/bench_ovseg.py --model test_sd --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from diffperc.backbones.registry import load_backbone
from diffperc.data.digits import CLASS_WORDS
from diffperc.data.ovseg import digit_scenes
from diffperc.zeroshot.ovseg import OVDiff
from diffperc.zeroshot.ovseg.inference import crop_boxes
from diffperc.zeroshot.ovseg.prototypes import PrototypeBank
from diffperc.zeroshot.ovseg.support import build_pipeline, sample_support_set


def clock(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--n", type=int, default=4, help="support images per class")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--classes", type=int, nargs="+", default=[1, 2, 4], help="vocabulary sizes for prepare")
    p.add_argument("--bank-classes", type=int, nargs="+", default=[10, 20, 40, 80], help="C for the test-image scaling")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--quick", action="store_true", help="2 images, 4 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.steps = 2, 4
    torch.set_num_threads(args.threads)
    bb = load_backbone(args.model)
    words = list(CLASS_WORDS)
    sample = dict(num_images=args.n, num_inference_steps=args.steps, template="a photo of the digit {}", progress=False)
    rows = []
    pipe = build_pipeline(bb)
    t_batched, _ = clock(lambda: sample_support_set(bb, words[0], batch_size=args.n, pipe=pipe, **sample))
    t_single, _ = clock(lambda: sample_support_set(bb, words[0], batch_size=1, pipe=pipe, **sample))
    rows.append(("sample 1 class, one call of N images", t_batched, t_single / t_batched))
    rows.append(("sample 1 class, N calls of 1 image (baseline)", t_single, 1.0))

    with tempfile.TemporaryDirectory() as cache:
        kw = dict(extractors=["sd"], cache_dir=cache, n_support=args.n, num_inference_steps=args.steps,
                  sample_batch_size=args.n, template="a photo of the digit {}", size=64, crops=(32, 24),
                  strides=(16, 16), progress=False)
        ov = OVDiff(bb, **kw)
        t_first, _ = clock(lambda: ov.prepare(words[:1]))
        ov_cached = OVDiff(bb, **kw)
        t_cached, _ = clock(lambda: ov_cached.prepare(words[:1]))
        rows.append(("prepare 1 class: sample + masks + prototypes", t_first, t_first / max(t_cached, 1e-9)))
        rows.append(("prepare 1 class again, from the cache", t_cached, 1.0))
        grow = []
        for c in args.classes:
            t, _ = clock(lambda c=c: OVDiff(bb, **kw).prepare(words[:c]))  # classes before c are cached
            grow.append((c, t))
        images = digit_scenes(4, seed=0)[0]
        ov.prepare(words[: max(args.classes)])
        t_img, _ = clock(lambda: [ov.predict(im) for im in images])
        n_crops = len(crop_boxes(64, 64, ov.crops, ov.strides))
        rows.append((f"test image 64x64 ({n_crops} crops, C={len(ov.classes)})", t_img / len(images), float("nan")))
        bank, base = ov.banks[0], list(ov.classes)
        scale = []
        for c in args.bank_classes:
            reps = -(-c // len(base))
            big = PrototypeBank(bank.protos.repeat(1, reps, 1, 1)[:, :c], bank.mask.repeat(1, reps, 1)[:, :c],
                                [f"{w}{i}" for i in range(reps) for w in base][:c])
            ov.banks, ov.classes = [big], big.classes
            t, _ = clock(lambda: [ov.predict(im) for im in images])
            scale.append((c, t / len(images)))
    print(f"OVDiff cost on {args.model}: N={args.n} support images, {args.steps} DPM-Solver steps, "
          f"{torch.get_num_threads()} thread(s)")
    print("| step | seconds | ratio vs baseline |\n|---|---|---|")
    for name, t, r in rows:
        print(f"| {name} | {t:.2f} | {'' if r != r else f'{r:.2f}x'} |")
    print("\nprepare, vocabulary of C new classes (classes before are cached):")
    prev = 0
    for c, t in grow:
        print(f"  C={c}: {t:.2f} s total ({t / max(c - prev, 1):.2f} s per new class)")
        prev = c
    print("\ntest image vs vocabulary size C (prototype banks of C classes, K per class kept):")
    for c, t in scale:
        print(f"  C={c}: {t:.3f} s per image")


if __name__ == "__main__":
    main()
