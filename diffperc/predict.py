"""Predictions of a trained dense task on a plain folder of images (``diffperc predict IMAGES_DIR --ckpt_path``).

Depth, semantic and referring segmentation checkpoints (``DepthTask``, ``SemSegTask``,
``RefSegTask``; saved by ``diffperc fit``) predict on any folder of images, no labels needed.
For each image ``<rel>.<ext>`` (relative to the folder) the output folder gets:

- depth: ``<rel>.png`` (inferno colours with a colour bar) and ``<rel>_depth_mm.png`` (16-bit, millimetres);
- semseg: ``<rel>.png`` (class colours over the image) and ``<rel>_labels.png`` (class ids; 8-bit,
  16-bit when there are more than 256 classes);
- refseg: ``<rel>.png`` (the object in red over the image, the sentence below) and ``<rel>_mask.png``
  (0 / 255). The sentences come from a file of ``<relative path>\\t<sentence>`` lines.

Images are read by :mod:`diffperc.images` and run one at a time at their own size (or with the
short side resized to ``size``; predictions are resized back to the original size).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["TASKS", "PredictSummary", "load_task", "predict_folder"]

TASKS = {"depth": "diffperc.tasks.depth.DepthTask", "semseg": "diffperc.tasks.semseg.SemSegTask",
         "refseg": "diffperc.tasks.refseg.RefSegTask"}


@dataclass
class PredictSummary:
    """What :func:`predict_folder` wrote: per image its outputs; unreadable images skipped (name, reason)."""

    task: str = ""
    written: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _task_name(class_path: str) -> str | None:
    return next((k for k, v in TASKS.items() if v == class_path or v.rsplit(".", 1)[1] == class_path), None)


def load_task(ckpt_path: str | os.PathLike, task: str | None = None, device: Any = None,
              torch_dtype: Any = None) -> tuple[str, Any]:
    """A dense task from a checkpoint, on ``device`` in ``torch_dtype``, in eval mode: (task name, module).

    Args:
        ckpt_path: a ``.ckpt`` written by ``diffperc fit`` (its hyperparameters name the task class).
        task: ``depth`` / ``semseg`` / ``refseg``; needed only for checkpoints without a class path.
    """
    import importlib

    from .devices import resolve_device, resolve_dtype

    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {str(ckpt_path)!r} does not exist: give the .ckpt that `diffperc fit` "
                                "wrote (under lightning_logs/version_N/checkpoints/)")
    if task is not None and task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    hparams = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    stored = hparams.get("_class_path")
    name = _task_name(stored) if stored else task
    if stored and name is None:
        raise ValueError(f"{path} is a {stored} checkpoint; `diffperc predict` on a folder handles "
                         f"{', '.join(TASKS.values())} (use `diffperc predict --config ... --ckpt_path` for others)")
    if name is None:
        raise ValueError(f"{path} does not record its task class: pass --task {'|'.join(TASKS)}")
    if task is not None and task != name:
        raise ValueError(f"--task {task} but {path} is a {stored} checkpoint")
    module, cls = TASKS[name].rsplit(".", 1)
    model = getattr(importlib.import_module(module), cls).load_from_checkpoint(path, map_location="cpu")
    return name, model.to(device=resolve_device(device), dtype=resolve_dtype(torch_dtype)).eval()


def _resize(x: Tensor, size: int | None) -> Tensor:
    """(1, 3, H, W) -> short side ``size`` (bilinear, antialiased); None keeps it."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    return F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                         antialias=scale < 1, align_corners=False).clamp(0, 1)


def _back(pred: Tensor, hw: tuple[int, int], mode: str) -> Tensor:
    """(1, C, h, w) prediction -> (1, C, H, W) at the original size."""
    if tuple(pred.shape[-2:]) == hw:
        return pred
    return F.interpolate(pred, size=hw, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


def _predict_one(name: str, model: Any, x: Tensor, hw: tuple[int, int], sentence: str | None) -> dict[str, Any]:
    if name == "depth":
        return {"depth": _back(model.predict_depth(x).float(), hw, "bilinear")[0, 0]}  # (H, W) metres
    if name == "semseg":
        logits = model.predict_logits(x).float()
        return {"labels": _back(logits, hw, "bilinear").argmax(1)[0]}  # (H, W) class ids
    logits = model(x, [sentence]).float()
    return {"labels": _back(logits, hw, "bilinear").argmax(1)[0]}  # (H, W) in {0, 1}


def _save(name: str, model: Any, image: Tensor, pred: dict[str, Any], stem: Path, sentence: str | None) -> list[Path]:
    from . import viz

    if name == "depth":
        d = pred["depth"].cpu()
        mm = np.clip(d.numpy() * 1000.0 + 0.5, 0, 65535).astype(np.uint16)
        return [viz.save_png(viz.depth_to_image(d[None], max_depth=model.max_depth), stem.with_name(stem.name + ".png")),
                viz.save_png(Image.fromarray(mm), stem.with_name(stem.name + "_depth_mm.png"))]
    labels = pred["labels"].cpu()
    if name == "semseg":
        raw = labels.numpy().astype(np.uint8 if model.num_classes <= 256 else np.uint16)
        return [viz.save_png(viz.mask_overlay(image, labels, alpha=0.5), stem.with_name(stem.name + ".png")),
                viz.save_png(Image.fromarray(raw), stem.with_name(stem.name + "_labels.png"))]
    overlay = viz.mask_overlay(image, labels, palette=((0, 0, 0), (255, 40, 40)), alpha=0.5, background=0)
    return [viz.save_png(viz.image_grid([overlay], nrow=1, labels=[sentence or ""]), stem.with_name(stem.name + ".png")),
            viz.save_png(Image.fromarray((labels.numpy() * 255).astype(np.uint8)), stem.with_name(stem.name + "_mask.png"))]


def predict_folder(ckpt_path: str | os.PathLike, images_dir: str | os.PathLike, out: str | os.PathLike,
                   task: str | None = None, sentences: str | os.PathLike | None = None, recursive: bool = False,
                   size: int | None = None, device: Any = None, torch_dtype: Any = None, strict: bool = False,
                   err: TextIO | None = None) -> PredictSummary:
    """Predict every image of a folder with a dense task checkpoint; PNGs under ``out`` (see module docstring).

    Args:
        ckpt_path: the task checkpoint. task: ``depth``/``semseg``/``refseg`` if the checkpoint lacks its class.
        images_dir: folder of images; ``recursive`` includes subfolders (outputs keep the relative paths).
        out: output folder.
        sentences: refseg only: ``<relative path>\\t<sentence>`` lines, one per image.
        size: resize the short side to this before predicting (None: the image's own size).
        device, torch_dtype: where and in which precision (default: cuda when available, float32).
        strict: stop at the first unreadable image instead of skipping it (skips are reported and counted).
    """
    from tqdm.auto import tqdm

    from .extract import image_name, list_image_files, read_prompt_file
    from .images import IMAGE_SUFFIXES, UnreadableImageError, open_image, to_tensor

    err = err or sys.stderr
    rels, _ = list_image_files(images_dir, recursive)
    if not rels:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(images_dir)!r}")
    if size is not None and size < 8:
        raise ValueError(f"--size must be >= 8 pixels, got {size}")
    name, model = load_task(ckpt_path, task, device, torch_dtype)
    if name == "refseg" and sentences is None:
        raise ValueError("a referring segmentation checkpoint needs --sentences FILE ('<image path>\\t<sentence>' "
                         "lines, one per image)")
    texts = read_prompt_file(sentences, rels, "--sentences", require_all=False) if name == "refseg" else {}
    if name == "refseg":
        missing = [r for r in rels if r not in texts]
        if len(missing) == len(rels):
            raise ValueError(f"--sentences {sentences} names none of the images (e.g. {rels[0]!r})")
    summary, root, out = PredictSummary(task=name), Path(images_dir).expanduser(), Path(out)
    param = next(model.parameters())
    for rel in tqdm(rels, desc=f"predict {name}", unit="img", file=err):
        if name == "refseg" and rel not in texts:
            summary.skipped.append((rel, "no sentence in --sentences"))
            tqdm.write(f"skipped {rel}: no sentence in --sentences", file=err)
            continue
        try:
            image = to_tensor(open_image(root / rel, name=rel))  # (3, H, W)
        except UnreadableImageError as e:
            if strict:
                raise
            summary.skipped.append((rel, str(e)))
            tqdm.write(f"skipped unreadable image {e}", file=err)
            continue
        x = _resize(image[None], size).to(param.device, param.dtype)
        # autocast as well: the tasks build float32 tensors of their own (prompt tables) at run time
        with torch.no_grad(), torch.autocast(param.device.type, param.dtype, enabled=param.dtype != torch.float32):
            pred = _predict_one(name, model, x, tuple(image.shape[-2:]), texts.get(rel))
        summary.written[rel] = _save(name, model, image, pred, out / image_name(rel), texts.get(rel))
    print(f"predict: wrote {name} predictions of {len(summary.written)} of {len(rels)} images to {out}", file=err)
    if summary.skipped:
        print(f"predict: skipped {len(summary.skipped)} image(s) (unreadable or without a sentence): "
              f"{', '.join(n for n, _ in summary.skipped)}", file=err)
    return summary
