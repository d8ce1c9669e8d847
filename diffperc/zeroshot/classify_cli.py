"""``diffperc classify IMAGE --classes "cat,dog,bird"``: zero-shot classification of one image.

The Diffusion Classifier (Li et al., "Your Diffusion Model is Secretly a Zero-Shot Classifier",
ICCV 2023, arXiv 2303.16203) from the command line: every class is scored on the same
``--samples`` (t, eps) pairs (or an adaptive ``--schedule``) and a ranked table is printed.
``cli.py`` wires :func:`add_parser` and :func:`run` in as the ``classify`` subcommand.

    diffperc classify digit.png --classes "zero,one,two,three,four,five,six,seven,eight,nine" \
        --template "a photo of the digit {}" --model digits --samples 50
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

__all__ = ["add_parser", "parse_schedule", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``classify`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "classify", help="zero-shot classify an image with the diffusion classifier",
        description="Score each class prompt by how well the model denoises the image under it (the "
        "Diffusion Classifier, Li et al. ICCV 2023) and print the classes ranked, best first. Lower error = "
        "better. Costs (number of classes x samples) UNet evaluations with the default naive schedule.")
    p.add_argument("image", help="image file (any size: the shorter side is resized to --size, centre crop)")
    p.add_argument("--classes", required=True, help="comma-separated class names, e.g. 'cat,dog,bird'")
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with '{}' for the class (default: the model's training caption, e.g. "
                   "'a photo of the digit {}' for digits; 'a photo of a {}.' for SD); repeat to ensemble")
    p.add_argument("--model", default="digits", help="preset name or diffusers folder / hub id (default: digits)")
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


def _load_image(path: str, size: int):  # -> Tensor (1, 3, size, size)
    import numpy as np
    import torch
    from PIL import Image

    from ..data.classification import resize_center_crop

    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    return resize_center_crop(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255, size)[None]


def classify_image(image: str, classes: list[str], templates: list[str] | None = None, model: str = "digits",
                   samples: int = 50, schedule: list[tuple[int, int]] | None = None, loss: str = "l2",
                   size: int | None = None, batch_size: int = 32, seed: int = 0,
                   timestep_range: tuple[int, int] | None = None, eliminate: float | None = None,
                   out: TextIO | None = None) -> int:
    """Classify one image file and print the ranked table; returns the index of the best class."""
    import torch

    from .._commands import native_size
    from ..backbones.registry import load_backbone
    from .classifier import DiffusionClassifier

    out = out or sys.stdout
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    backbone = load_backbone(model)
    size = size or native_size(backbone)
    if size % backbone.size_multiple:
        raise ValueError(f"--size {size} is not a multiple of {backbone.size_multiple} for model {model}")
    clf = DiffusionClassifier.from_classes(
        backbone, classes, templates or None, schedule=schedule or [(samples, 1)], loss=loss,
        batch_size=batch_size, seed=seed, timestep_range=timestep_range, eliminate=eliminate, progress=True)
    with torch.no_grad():
        res = clf.classify(_load_image(image, size).to(backbone.device))
    width = max(5, *(len(c) for c in classes))
    print(f"{'rank':>4}  {'class':<{width}}  {'error':>10}  {'pairs':>5}", file=out)
    for rank, k in enumerate(res.ranking[0].tolist(), 1):
        print(f"{rank:>4}  {classes[k]:<{width}}  {res.scores[0, k].item():>10.6f}  {int(res.n_pairs[0, k]):>5}",
              file=out)
    print(f"UNet evaluations: {int(res.unet_evals[0])} (naive: {res.naive_evals}); model {model}, {size}x{size} "
          f"px, loss {loss}", file=out)
    return int(res.pred[0])


def run(args: argparse.Namespace) -> int:
    """Run ``diffperc classify`` from parsed arguments; returns the exit code (0 ok, 1 error)."""
    try:
        classes = [c.strip() for c in args.classes.split(",")]
        if any(not c for c in classes):
            raise ValueError(f"--classes has an empty name: {args.classes!r} (comma-separated, e.g. 'cat,dog')")
        schedule = parse_schedule(args.schedule) if args.schedule else None
        classify_image(args.image, classes, args.template, model=args.model, samples=args.samples, schedule=schedule,
                       loss=args.loss, size=args.size, batch_size=args.batch_size, seed=args.seed,
                       timestep_range=parse_range(args.timestep_range), eliminate=args.eliminate)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"diffperc classify: error: {err}", file=sys.stderr)
        return 1
    return 0
