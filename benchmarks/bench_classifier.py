"""Diffusion Classifier on the bundled digits model: naive vs adaptive evaluation, side by side.

Li, Prabhudesai, Duggal, Brown, Pathak, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", ICCV 2023, arXiv 2303.16203 (adaptive schedule: diffusion-classifier's
``eval_prob_adaptive.py``). Zero-shot top-1 on the 297 held-out digits (images 1500-1796 of
scikit-learn's ``load_digits``, never seen in training), prompts "a photo of the digit {word}":

  - naive: all 10 classes on all S (t, eps) pairs (S evenly spaced timesteps, seeded noise);
  - adaptive: rounds ``n_samples:keep`` (one row per ``--schedule``); the last round uses the same S
    pairs, so the runs share every (pair, class) error they both compute.

Latents are encoded once and shared by both runs. Target (issue 4): the adaptive schedule needs
at least 3x fewer UNet evaluations per image than the naive one for at most 1 point less accuracy.

    python benchmarks/bench_classifier.py --threads 2                      # S=100, adaptive 5:5,25:2,100:1
    python benchmarks/bench_classifier.py --samples 100 --schedule 5:5,25:2,100:1 --schedule 10:5,20:2,100:1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffperc.backbones.registry import create_backbone  # noqa: E402
from diffperc.data.digits import CLASS_WORDS, load  # noqa: E402
from diffperc.zeroshot.classifier import DiffusionClassifier  # noqa: E402
from diffperc.zeroshot.classify_cli import parse_schedule  # noqa: E402


def run(clf: DiffusionClassifier, latents: torch.Tensor, schedule: list[tuple[int, int]], chunk: int):
    """Predictions (N,), UNet evaluations per image (N,), seconds; ``chunk`` images per classify call."""
    preds, evals = [], []
    start = time.perf_counter()
    for i in tqdm(range(0, len(latents), chunk), desc=f"schedule {schedule}", unit="chunk", file=sys.stderr):
        out = clf.classify(latents=latents[i : i + chunk], schedule=schedule)
        preds.append(out.pred)
        evals.append(out.unet_evals)
    return torch.cat(preds), torch.cat(evals), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100, help="S: pairs of the naive run (default 100)")
    p.add_argument("--schedule", action="append", default=None,
                   help="adaptive rounds n_samples:keep, repeatable (default 5:5,25:2,100:1)")
    p.add_argument("--limit", type=int, default=None, help="first N held-out digits (default: all 297)")
    p.add_argument("--loss", default="l2", choices=("l2", "l1", "huber"))
    p.add_argument("--batch-size", type=int, default=250, help="latents per UNet call")
    p.add_argument("--chunk", type=int, default=33, help="images per classify call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    schedules = {text: parse_schedule(text) for text in args.schedule or ["5:5,25:2,100:1"]}
    for text, schedule in schedules.items():
        if schedule[-1][0] != args.samples:
            p.error(f"the last adaptive round must use the naive run's S={args.samples} pairs, got {text}")

    bb = create_backbone("digits")
    images, labels = load("heldout")
    images, labels = images[: args.limit], labels[: args.limit]
    clf = DiffusionClassifier.from_classes(bb, CLASS_WORDS, "a photo of the digit {}", loss=args.loss,
                                           batch_size=args.batch_size, seed=args.seed)
    latents = clf.encode(images)  # the VAE once per image, shared by both runs
    rows = {}
    for name, sched in [(f"naive {args.samples}:1", [(args.samples, 1)])] + [(f"adaptive {t}", s) for t, s in
                                                                              schedules.items()]:
        pred, evals, secs = run(clf, latents, sched, args.chunk)
        rows[name] = (pred, (pred == labels).float().mean().item(), evals.float().mean().item(), secs)

    n = len(labels)
    print(f"digits model, {n} held-out digits, loss {args.loss}, S={args.samples} evenly spaced timesteps, "
          f"seed {args.seed}, {torch.get_num_threads()} threads")
    print("| schedule | top-1 | UNet evals / image | evals vs naive | s / image |\n|---|---|---|---|---|")
    naive_pred, naive_acc, base, _ = rows[f"naive {args.samples}:1"]
    for name, (_, acc, ev, secs) in rows.items():
        print(f"| {name} | {100 * acc:.1f} % | {ev:.0f} | {base / ev:.2f}x fewer | {secs / n:.3f} |")
    print()
    for name, (pred, acc, ev, _) in list(rows.items())[1:]:
        diff, ratio = 100 * (acc - naive_acc), base / ev
        agree = (pred == naive_pred).float().mean().item()
        ok = ratio >= 3 and diff >= -1
        print(f"{name} vs naive: {ratio:.2f}x fewer evaluations, accuracy {diff:+.2f} points ({round(diff * n / 100):+d} "
              f"of {n} images), same prediction on {100 * agree:.1f} % of images. "
              f"Target (>= 3x fewer, <= 1 point less): {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
