"""Zero-shot classification of image files and folders with the Diffusion Classifier (``diffperc classify``).

Li et al., "Your Diffusion Model is Secretly a Zero-Shot Classifier", ICCV 2023, arXiv 2303.16203:
every class is scored on the same (t, eps) pairs (or an adaptive schedule); lower error = better.
Images go through :mod:`diffperc.images` (EXIF, 16-bit, allow-listed decoders), then shorter
side to ``size`` + centre crop, as the classifier's datasets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = ["classify_files", "classify_image", "print_table"]


def _build(model: str, classes: list[str], templates: list[str] | None, samples: int,
           schedule: list[tuple[int, int]] | None, loss: str, size: int | None, batch_size: int, seed: int,
           timestep_range: tuple[int, int] | None, eliminate: float | None, device: Any, torch_dtype: Any):
    from .._commands import native_size
    from ..devices import load_backbone
    from .classifier import DiffusionClassifier

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    backbone = load_backbone(model, device=device, torch_dtype=torch_dtype)
    size = size or native_size(backbone)
    if size % backbone.size_multiple:
        raise ValueError(f"--size {size} is not a multiple of {backbone.size_multiple} for model {model}")
    clf = DiffusionClassifier.from_classes(
        backbone, classes, templates or None, schedule=schedule or [(samples, 1)], loss=loss,
        batch_size=batch_size, seed=seed, timestep_range=timestep_range, eliminate=eliminate, progress=True)
    return backbone, clf, size


def _read(path: str | os.PathLike, size: int, name: str | None = None) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: shorter side to ``size`` (bicubic), centre crop."""
    from ..data.classification import resize_center_crop
    from ..images import open_image, to_tensor

    return resize_center_crop(to_tensor(open_image(path, name=name)), size)[None]


def _row(name: str, classes: list[str], res: Any, i: int = 0) -> dict[str, Any]:
    ranking = res.ranking[i].tolist()
    return {"image": name, "pred": classes[int(res.pred[i])],
            "ranking": [classes[k] for k in ranking],
            "errors": {classes[k]: float(res.scores[i, k]) for k in ranking},
            "pairs": {classes[k]: int(res.n_pairs[i, k]) for k in ranking},
            "unet_evals": int(res.unet_evals[i]), "naive_evals": int(res.naive_evals)}


def print_table(row: dict[str, Any], naive: int, footer: str, out: TextIO) -> None:
    """The ranked table of one image: rank, class, error, pairs; then the UNet evaluation count."""
    width = max(5, *(len(c) for c in row["ranking"]))
    print(f"{'rank':>4}  {'class':<{width}}  {'error':>10}  {'pairs':>5}", file=out)
    for rank, c in enumerate(row["ranking"], 1):
        print(f"{rank:>4}  {c:<{width}}  {row['errors'][c]:>10.6f}  {row['pairs'][c]:>5}", file=out)
    print(f"UNet evaluations: {row['unet_evals']} (naive: {naive}); {footer}", file=out)


def classify_image(image: str, classes: list[str], templates: list[str] | None = None, model: str = "digits",
                   samples: int = 50, schedule: list[tuple[int, int]] | None = None, loss: str = "l2",
                   size: int | None = None, batch_size: int = 32, seed: int = 0,
                   timestep_range: tuple[int, int] | None = None, eliminate: float | None = None,
                   out: TextIO | None = None, device: str | torch.device | None = None,
                   torch_dtype: str | torch.dtype | None = None) -> int:
    """Classify one image file and print the ranked table; returns the index of the best class."""
    out = out or sys.stdout
    backbone, clf, size = _build(model, classes, templates, samples, schedule, loss, size, batch_size, seed,
                                 timestep_range, eliminate, device, torch_dtype)
    with torch.no_grad():
        res = clf.classify(_read(image, size).to(backbone.device))
    print_table(_row(str(image), classes, res), res.naive_evals, f"model {model}, {size}x{size} px, loss {loss}", out)
    return int(res.pred[0])


def classify_files(root: str | os.PathLike, images: Sequence[str], classes: list[str],
                   templates: list[str] | None = None, model: str = "digits", samples: int = 50,
                   schedule: list[tuple[int, int]] | None = None, loss: str = "l2", size: int | None = None,
                   batch_size: int = 32, seed: int = 0, timestep_range: tuple[int, int] | None = None,
                   eliminate: float | None = None, device: str | torch.device | None = None,
                   torch_dtype: str | torch.dtype | None = None,
                   err: TextIO | None = None) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Classify ``root/<image>`` for each relative path; unreadable images are reported on ``err`` and skipped.

    Returns:
        one row per classified image ({"image", "pred", "ranking", "errors", "pairs", "unet_evals"}),
        and the skipped (image, reason) pairs.
    """
    from tqdm.auto import tqdm

    from ..images import UnreadableImageError

    err = err or sys.stderr
    backbone, clf, size = _build(model, classes, templates, samples, schedule, loss, size, batch_size, seed,
                                 timestep_range, eliminate, device, torch_dtype)
    rows, skipped = [], []
    for rel in tqdm(images, desc="classify", unit="img", file=err):
        try:
            x = _read(Path(root) / rel, size, name=rel)
        except UnreadableImageError as e:
            skipped.append((rel, str(e)))
            tqdm.write(f"skipped unreadable image {e}", file=err)
            continue
        with torch.no_grad():
            rows.append({**_row(rel, classes, clf.classify(x.to(backbone.device))), "size": size})
    return rows, skipped
