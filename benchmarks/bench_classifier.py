"""Diffusion Classifier on the bundled digits model: naive vs adaptive evaluation, side by side.

Li, Prabhudesai, Duggal, Brown, Pathak, "Your Diffusion Model is Secretly a Zero-Shot
Classifier", ICCV 2023, arXiv 2303.16203 (adaptive schedule: diffusion-classifier's
``eval_prob_adaptive.py``). Zero-shot top-1 on the 297 held-out digits (images 1500-1796 of
scikit-learn's ``load_digits``, never seen in training), prompts "a photo of the digit {word}":

  - naive: all 10 classes on all S (t, eps) pairs (S evenly spaced timesteps, seeded noise);
  - adaptive: rounds ``n_samples:keep`` over the same S pairs, so both share every (pair, class)
    error they both compute.

How the adaptive settings are chosen, without looking at the held-out digits. The model was
trained on images 0-1499, so it is surer of them than of unseen digits; the tuning set is
therefore ``--tune`` training digits each shifted by one pixel (seeded, ``--tune-shift``):
variants the model never saw. Their naive error matrix (image x class x pair) is computed once.
Then every candidate is replayed on it (``DiffusionClassifier.classify_errors``: no UNet call,
exactly what ``classify`` returns): schedules of two or three rounds with the paper's fixed
``keep``, and schedules with successive elimination (``eliminate`` t thresholds
``--eliminate``) after a first round of >= 8 pairs. Among those costing at most
naive / ``--min-saving`` x ``--budget-margin`` evaluations on the tuning set, the one that agrees
most often with the naive prediction wins (ties: accuracy, then fewer evaluations).

On the held-out digits the naive run gives the naive accuracy and prices every schedule; the
chosen one is then also run for real (``classify``) to time it and to check that it predicts
what the replay said.

Timesteps: the paper's full range [0, T) by default. ``--ranges 0,300,500,700`` first picks the
range [lo, T) of best naive accuracy on the tuning set (a range uses the full grid's columns
t >= lo there; the held-out run draws its own noise for its S' = S (T - lo) / T pairs), then the
schedule over it; the full-range naive run is reported beside it.

Target (issue 11, on the v2 model): the adaptive schedule needs at least 5x fewer UNet
evaluations per image than the naive one for at most 1 point less accuracy (``--min-saving``).
``--card checkpoints/digits`` records the chosen schedule's numbers in the model's eval.json and
re-renders its model card.

    python benchmarks/bench_classifier.py --threads 2 --cache /tmp/clf_errors.pt  # S=100, 400 tuning digits
    python benchmarks/bench_classifier.py --ranges 0,300,500,700 --schedule 5:5,25:2,100:1
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffperc.backbones.registry import load_backbone  # noqa: E402
from diffperc.data.digits import CLASS_WORDS, load  # noqa: E402
from diffperc.zeroshot.classifier import DiffusionClassifier  # noqa: E402
from diffperc.zeroshot.classify_cli import parse_schedule  # noqa: E402

ROUND_SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)


def shifted(images: torch.Tensor, max_shift: int, seed: int) -> torch.Tensor:
    """Each image translated by a seeded (dx, dy) in [-max_shift, max_shift]^2 other than (0, 0), zero-filled."""
    g = torch.Generator().manual_seed(seed)
    offsets = [(dx, dy) for dx in range(-max_shift, max_shift + 1) for dy in range(-max_shift, max_shift + 1)
               if (dx, dy) != (0, 0)]
    m = max_shift
    padded = torch.nn.functional.pad(images, (m, m, m, m))
    h, w = images.shape[-2:]
    out = torch.empty_like(images)
    for i, j in enumerate(torch.randint(len(offsets), (len(images),), generator=g).tolist()):
        dx, dy = offsets[j]
        out[i] = padded[i, :, m - dy : m - dy + h, m - dx : m - dx + w]
    return out


def naive_errors(clf: DiffusionClassifier, latents: torch.Tensor, chunk: int, desc: str):
    """(N, K, S) errors of every image, class and pair on the default pairs (the naive run), and its seconds."""
    out, start = [], time.perf_counter()
    for i in tqdm(range(0, len(latents), chunk), desc=desc, unit="chunk", file=sys.stderr):
        out.append(clf.pair_errors(latents=latents[i : i + chunk]))
    return torch.cat(out), time.perf_counter() - start


def candidates(n_classes: int, n_pairs: int, eliminates: list[float]) -> list[tuple[tuple, float | None]]:
    """(schedule, eliminate) pairs, each schedule ending in (S, 1); their cost is priced by replaying them.

    Fixed keep (the paper's rule): two and three rounds. With successive elimination: a first round
    of >= 8 pairs on every class (elimination needs 8 shared pairs), then up to two capped rounds
    and a round keeping 2.
    """
    sizes = [n for n in ROUND_SIZES if n < n_pairs]
    out: list[tuple[tuple, float | None]] = []
    for n1, k1 in itertools.product(sizes, range(2, n_classes)):
        out.append((((n1, k1), (n_pairs, 1)), None))
        for n2, k2 in itertools.product([n for n in sizes if n > n1], range(2, k1)):
            out.append((((n1, k1), (n2, k2), (n_pairs, 1)), None))
    for z in eliminates:
        for n1 in [n for n in sizes if n >= 8]:
            out.append((((n1, n_classes), (n_pairs, 1)), z))
            for n2, k2 in itertools.product([n for n in sizes if n > n1], (2, 3, 4, 5, n_classes)):
                out.append((((n1, n_classes), (n2, k2), (n_pairs, 1)), z))
                for n3 in [n for n in sizes if n > n2] if k2 > 2 else []:
                    out.append((((n1, n_classes), (n2, k2), (n3, 2), (n_pairs, 1)), z))
    return out


def text(schedule, eliminate: float | None = None) -> str:
    rounds = ",".join(f"{n}:{k}" for n, k in schedule)
    return rounds if eliminate is None else f"{rounds} eliminate t>{eliminate:g}"


class Cache:
    """Naive error matrices by settings, kept in one .pt file (written atomically) when a path is given."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data = torch.load(path) if path is not None and path.exists() else {}

    def get(self, key: tuple, compute):
        if key not in self.data:
            self.data[key] = compute()
            if self.path is not None:
                from diffperc._io import atomic_file

                with atomic_file(self.path) as tmp:
                    torch.save(self.data, tmp)
        else:
            print(f"naive errors {key} read from {self.path}", file=sys.stderr)
        return self.data[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits", help="preset or model folder (default: the bundled digits model)")
    p.add_argument("--samples", type=int, default=100, help="S: pairs of the full-range naive run (default 100)")
    p.add_argument("--ranges", default="0",
                   help="timestep-range starts lo (range [lo, T)) to choose from, multiples of T/S, e.g. 0,300,500,700 "
                   "(default 0: the paper's full range)")
    p.add_argument("--schedule", action="append", default=[],
                   help="extra adaptive schedules n_samples:keep,... over the chosen range to report, repeatable")
    p.add_argument("--tune", type=int, default=400, help="tuning digits (training digits, shifted; default 400)")
    p.add_argument("--tune-shift", type=int, default=1, help="largest shift of the tuning digits in pixels")
    p.add_argument("--min-saving", type=float, default=5.0, help="schedules cost at most naive / this (default 5)")
    p.add_argument("--budget-margin", type=float, default=0.95,
                   help="...times this on the tuning set, as unseen digits may cost more (default 0.95)")
    p.add_argument("--eliminate", default="2,3,4",
                   help="successive-elimination t thresholds to try beside fixed keep ('' for none; default 2,3,4)")
    p.add_argument("--limit", type=int, default=None, help="first N held-out digits (default: all 297)")
    p.add_argument("--loss", default="l2", choices=("l2", "l1", "huber"))
    p.add_argument("--batch-size", type=int, default=250, help="latents per UNet call")
    p.add_argument("--chunk", type=int, default=33, help="images per pair_errors / classify call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache", type=Path, default=None, help="keep naive error matrices in this .pt file and reuse them")
    p.add_argument("--card", type=Path, default=None,
                   help="model folder whose eval.json gets the chosen schedule's numbers (and whose card is re-rendered)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    T, S = 1000, args.samples
    lows = sorted({int(v) for v in args.ranges.split(",")})
    if any(lo * S % T or not 0 <= lo < T for lo in lows):
        p.error(f"--ranges starts must be multiples of T/S = {T / S:g} in [0, {T}), got {lows}")

    bb = load_backbone(args.model)

    def make(lo: int, **kw) -> DiffusionClassifier:
        kw.setdefault("schedule", [(S - lo * S // T, 1)])  # naive over the range's S' pairs unless told
        return DiffusionClassifier.from_classes(bb, CLASS_WORDS, "a photo of the digit {}", loss=args.loss,
                                                batch_size=args.batch_size, seed=args.seed,
                                                timestep_range=(lo, T), **kw)

    held_images, held_labels = load("heldout")
    held_images, held_labels = held_images[: args.limit], held_labels[: args.limit]
    train_images, train_labels = load("train")
    pick = torch.linspace(0, len(train_images) - 1, args.tune).round().long()
    tune_images, tune_labels = shifted(train_images[pick], args.tune_shift, args.seed), train_labels[pick]
    cache = Cache(args.cache)
    common = (args.loss, args.seed)

    full = make(0)
    tune_err = cache.get(("tune", args.tune, args.tune_shift, 0, S, *common),
                         lambda: naive_errors(full, full.encode(tune_images), args.chunk, "naive, tuning digits")[0])

    # 1. the timestep range
    range_acc = {}
    for lo in lows:
        cols = tune_err[:, :, lo * S // T :]
        pred = make(lo).classify_errors(cols, [(cols.shape[-1], 1)]).pred
        range_acc[lo] = (pred == tune_labels).float().mean().item()
    lo = max(lows, key=lambda v: (range_acc[v], v))
    S2 = S - lo * S // T
    clf = make(lo)
    print(f"tuning set: {args.tune} training digits shifted by 1-{args.tune_shift} px; naive top-1 by timestep range: "
          + ", ".join(f"[{v}, {T}) {100 * a:.1f} %" for v, a in range_acc.items()) + f" -> [{lo}, {T}), S = {S2}")

    # 2. the schedule
    cols = tune_err[:, :, lo * S // T :]
    naive = [(S2, 1)]
    tune_naive = clf.classify_errors(cols, naive).pred
    budget = clf.num_conditions * S2 / args.min_saving * args.budget_margin
    eliminates = [float(v) for v in args.eliminate.split(",") if v.strip()]
    ranked = []
    for sched, z in tqdm(candidates(clf.num_classes, S2, eliminates), desc="replaying candidates", file=sys.stderr):
        out = clf.classify_errors(cols, sched, eliminate=z)
        ev = out.unet_evals.float().mean().item()
        if ev <= budget:
            agree = (out.pred == tune_naive).float().mean().item()
            ranked.append((-agree, -(out.pred == tune_labels).float().mean().item(), ev, sched, z))
    if not ranked:
        sys.exit(f"no candidate schedule over S = {S2} pairs costs at most {budget:.0f} evaluations: raise --samples")
    ranked.sort()
    chosen, chosen_z = ranked[0][3], ranked[0][4]
    print(f"{len(ranked)} schedules over [{lo}, {T}) cost at most {budget:.0f} evaluations on the tuning set; best "
          "five by agreement with naive:")
    for neg_agree, neg_acc, ev, sched, z in ranked[:5]:
        print(f"  {text(sched, z)}: agrees {100 * -neg_agree:.1f} %, top-1 {100 * -neg_acc:.1f} %, {ev:.0f} evals")
    extra = [tuple(parse_schedule(t)) for t in args.schedule]
    for sched in [s for s in extra if s[-1][0] != S2]:
        print(f"--schedule {text(sched)} skipped: its last round must use the chosen range's S = {S2} pairs")
    extra = [(s, None) for s in extra if s[-1][0] == S2 and (s, None) != (chosen, chosen_z)]

    # held-out: naive matrices (chosen range, and the full range if narrower), then the chosen schedule for real
    held_lat = clf.encode(held_images)
    n = len(held_labels)

    def held_naive(c: DiffusionClassifier, lo_: int, s_: int):
        return cache.get(("heldout", n, lo_, s_, *common),
                         lambda: naive_errors(c, held_lat, args.chunk, f"naive [{lo_}, {T}), held-out digits"))

    held_err, naive_secs = held_naive(make(lo), lo, S2)
    start = time.perf_counter()
    real = []
    for i in tqdm(range(0, n, args.chunk), desc=f"adaptive {text(chosen, chosen_z)}, for real", unit="chunk",
                  file=sys.stderr):
        real.append(clf.classify(latents=held_lat[i : i + args.chunk], schedule=chosen, eliminate=chosen_z).pred)
    real_pred, real_secs = torch.cat(real), time.perf_counter() - start

    naive_out = clf.classify_errors(held_err, naive)
    naive_acc, base = (naive_out.pred == held_labels).float().mean().item(), float(naive_out.unet_evals[0])
    print(f"\ndigits model, {n} held-out digits, loss {args.loss}, timesteps evenly spaced over [{lo}, {T}), "
          f"seed {args.seed}, {torch.get_num_threads()} threads")
    print("| schedule | top-1 | UNet evals / image | evals vs naive | same as naive | s / image |")
    print("|---|---|---|---|---|---|")
    if lo:
        full_err, full_secs = held_naive(full, 0, S)
        full_acc = (full.classify_errors(full_err, [(S, 1)]).pred == held_labels).float().mean().item()
        print(f"| naive {S}:1 over [0, {T}) (the paper's range) | {100 * full_acc:.1f} % | {10 * S} | "
              f"{10 * S / base:.2f}x more | - | {full_secs / n:.3f} |")
    print(f"| naive {text(naive)} | {100 * naive_acc:.1f} % | {base:.0f} | 1.00x | 100.0 % | {naive_secs / n:.3f} |")
    verdicts = []
    for label, sched, z in [(f"adaptive {text(chosen, chosen_z)} (chosen on the tuning set)", chosen, chosen_z)] + [
            (f"adaptive {text(s)}", s, None) for s, _ in extra]:
        out = clf.classify_errors(held_err, sched, eliminate=z)
        acc, ev = (out.pred == held_labels).float().mean().item(), out.unet_evals.float().mean().item()
        agree = (out.pred == naive_out.pred).float().mean().item()
        secs = f"{real_secs / n:.3f}" if (sched, z) == (chosen, chosen_z) else "(replayed)"
        print(f"| {label} | {100 * acc:.1f} % | {ev:.0f} | {base / ev:.2f}x fewer | {100 * agree:.1f} % | {secs} |")
        diff, ratio = 100 * (acc - naive_acc), base / ev
        verdicts.append(f"{text(sched, z)} vs naive over [{lo}, {T}): {ratio:.2f}x fewer evaluations, accuracy "
                        f"{diff:+.2f} points ({round(diff * n / 100):+d} of {n} images). Target (>= {args.min_saving:g}x "
                        f"fewer, <= 1 point less): {'MET' if ratio >= args.min_saving and diff >= -1 else 'NOT MET'}")
        if (sched, z) == (chosen, chosen_z):
            result = {"schedule": text(sched), "eliminate": z, "accuracy": acc, "evals": ev,
                      "naive_accuracy": naive_acc, "naive_evals": int(base), "timestep_range": [lo, T],
                      "images": n, "agree_with_naive": agree}
    print()
    same = torch.equal(real_pred, clf.classify_errors(held_err, chosen, eliminate=chosen_z).pred)
    print(f"the real adaptive run of {text(chosen, chosen_z)} predicts {'exactly' if same else 'NOT'} what its replay predicts "
          f"({real_secs / naive_secs:.2f}x the naive run's time)")
    print("\n".join(verdicts))
    if not same:
        sys.exit("replay and real run disagree")
    if args.card:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        import eval_digits

        eval_digits.update_json(args.card / "eval.json", adaptive=result)
        eval_digits.write_text_atomic(args.card / "README.md", eval_digits.render_card(args.card))
        print(f"recorded in {args.card / 'eval.json'} and {args.card / 'README.md'}")


if __name__ == "__main__":
    main()
