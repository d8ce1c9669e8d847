"""``diffperc classify IMAGE|DIR --classes "cat,dog"``: zero-shot classification (``diffperc.zeroshot.classify_images``).

The Diffusion Classifier (Li et al., ICCV 2023, arXiv 2303.16203): every class is scored on the
same ``--samples`` (t, eps) pairs (or an adaptive ``--schedule``). One image: a ranked table.
A folder: one line per image; ``--out results.json|.csv`` writes every score.

    diffperc classify digit.png --classes "zero,one,two,three,four,five,six,seven,eight,nine" \\
        --template "a photo of the digit {}" --model digits --samples 50
    diffperc classify my_photos/ --classes "cat,dog" --model sd21-base --out labels.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._options import add_device_options, add_model_option, fail

__all__ = ["add_parser", "parse_range", "parse_schedule", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``classify`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "classify", help="zero-shot classify an image or a folder with the diffusion classifier",
        description="Score each class prompt by how well the model denoises the image under it (the "
        "Diffusion Classifier, Li et al. ICCV 2023) and print the classes ranked, best first. Lower error = "
        "better. Costs (number of classes x samples) UNet evaluations per image with the default naive schedule.")
    p.add_argument("image", help="image file or folder of images (any size: the shorter side is resized to "
                   "--size, centre crop)")
    p.add_argument("--classes", required=True, help="comma-separated class names, e.g. 'cat,dog,bird'")
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with '{}' for the class (default: the model's training caption, e.g. "
                   "'a photo of the digit {}' for digits; 'a photo of a {}.' for SD); repeat to ensemble")
    add_model_option(p)
    p.add_argument("--samples", type=int, default=50,
                   help="(t, eps) pairs per class, evenly spaced timesteps (default: 50)")
    p.add_argument("--schedule", default=None,
                   help="adaptive rounds 'n_samples:keep,...' instead of --samples, e.g. '50:5,500:1'")
    p.add_argument("--loss", choices=("l2", "l1", "huber"), default="l2")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    p.add_argument("--batch-size", type=int, default=32, help="latents per UNet call (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared noise (default: 0)")
    p.add_argument("--timestep-range", default=None, metavar="LO,HI",
                   help="spread the pairs' timesteps over [LO, HI) instead of all of [0, T), e.g. '300,1000'")
    p.add_argument("--eliminate", type=float, default=None, metavar="T",
                   help="with --schedule: also drop, after each round, classes whose paired t statistic against "
                   "the leader exceeds T (e.g. 3)")
    p.add_argument("--recursive", "-r", action="store_true", help="with a folder: include subfolders")
    p.add_argument("--out", default=None, metavar="FILE.json|FILE.csv",
                   help="also write the results (prediction, ranking, errors per class) of every image")
    add_device_options(p)
    return p


def parse_range(text: str | None) -> tuple[int, int] | None:
    """``"300,1000"`` -> ``(300, 1000)``; None stays None."""
    if text is None:
        return None
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--timestep-range must look like '300,1000' (LO,HI), got {text!r}") from None
    return lo, hi


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """``"50:5,500:1"`` -> ``[(50, 5), (500, 1)]``."""
    try:
        return [(int(n), int(k)) for n, k in (part.split(":") for part in text.split(",") if part.strip())]
    except ValueError:
        raise ValueError(f"--schedule must look like '50:5,500:1' (n_samples:keep rounds), got {text!r}") from None


def _classify(args: argparse.Namespace, classes: list[str], **common) -> int:
    from .._results import write_rows
    from ..devices import resolve_device
    from ..extract import list_image_files
    from ..zeroshot.classify_images import classify_files, print_table

    path = Path(args.image).expanduser()
    if args.out is not None and Path(args.out).suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--out {args.out!r}: results are written as .json or .csv")
    if path.is_dir():
        images, _ = list_image_files(path, args.recursive, what="IMAGE folder")
        if not images:
            raise FileNotFoundError(f"no images in the folder {str(path)!r}")
        root = path
    else:
        root, images = path.parent, [path.name]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    common["device"] = resolve_device(args.device)
    rows, skipped = classify_files(root, images, classes, args.template, torch_dtype=args.dtype, **common)
    if path.is_dir():
        width = max(5, *(len(r["image"]) for r in rows)) if rows else 5
        print(f"{'image':<{width}}  {'pred':<12}  {'error':>10}")
        for r in rows:
            print(f"{r['image']:<{width}}  {r['pred']:<12}  {r['errors'][r['pred']]:>10.6f}")
        print(f"classified {len(rows)} of {len(images)} images" + (f"; skipped {len(skipped)} unreadable: "
              + ", ".join(n for n, _ in skipped) if skipped else ""), file=sys.stderr)
    elif skipped:
        raise ValueError(skipped[0][1])
    else:
        rows[0]["image"] = str(path)
        size = rows[0]["size"]
        print_table(rows[0], rows[0]["naive_evals"], f"model {args.model}, {size}x{size} px, loss {args.loss}",
                    sys.stdout)
    if args.out is not None and rows:
        print(write_rows(rows, args.out))
    return 0 if rows else 1


def run(args: argparse.Namespace) -> int:
    """Run ``diffperc classify`` from parsed arguments; returns the exit code (0 ok, 1 error)."""
    try:
        classes = [c.strip() for c in args.classes.split(",")]
        if any(not c for c in classes):
            raise ValueError(f"--classes has an empty name: {args.classes!r} (comma-separated, e.g. 'cat,dog')")
        schedule = parse_schedule(args.schedule) if args.schedule else None
        return _classify(args, classes, model=args.model, samples=args.samples, schedule=schedule, loss=args.loss,
                         size=args.size, batch_size=args.batch_size, seed=args.seed,
                         timestep_range=parse_range(args.timestep_range), eliminate=args.eliminate)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as err:
        return fail("classify", err)
