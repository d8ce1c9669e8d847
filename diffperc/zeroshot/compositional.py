"""Compositional image-text discrimination with diffusion classifiers: per-timestep errors, metrics, tables.

Jeong et al., "Diffusion Classifiers Understand Compositionality, but Conditions Apply", NeurIPS 2025
D&B (eugene6923/Diffusion-Classifiers-Compositionality, building on McGill-NLP/diffusion-itm).
For every item (:mod:`diffperc.data.compositional`) the error of each (caption, image) pair is kept
**per timestep** in an :class:`ErrorBank` (the released ``score_results/*_scores.pt``
``scores_with_timestep``), so metrics under any timestep weighting, and learned weights
(:mod:`~diffperc.zeroshot.compositional_weights`), come from the saved errors without a new
UNet/transformer call.

Scoring follows the released defaults: 30 timesteps on the released grid (SD: 32, 65, ..., 989;
SD3: 65.97, ..., 993.24), one seeded noise per timestep shared by every caption and image, the
residual's L2 norm (the CLI's ``--use_normed_classifier`` is a ``store_false`` flag, so it is on by
default), no CFG. ``normalize=True`` subtracts each image's error under the empty caption
(``--img_retrieval``: needed to compare images under one caption fairly). Metrics: Winoground's
text / image / group scores for 2x2 items, accuracy elsewhere; ties count as wrong.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import atomic_file, write_text_atomic
from .classifier import DiffusionClassifier, evenly_spaced
from .flow import RELEASED_START_SD, FlowMatchingClassifier, released_grid, warn_long_captions

__all__ = ["ErrorBank", "format_table", "is_flow_model", "item_errors", "score_items", "task_metrics", "write_table"]


def is_flow_model(backbone: Any) -> bool:
    """A rectified-flow model (SD3/FLUX interface: ``predict`` + ``transformer``) rather than an SD UNet backbone."""
    return hasattr(backbone, "transformer") and hasattr(backbone, "predict")


def make_scorer(backbone: Any, captions: Sequence[str], n_timesteps: int = 30, timesteps: str = "released",
                loss: str = "l2_norm", weighting: str | None = None, seed: int = 0,
                batch_size: int = 32) -> tuple[DiffusionClassifier, Tensor]:
    """A classifier over ``captions`` and the run's timestep positions (S,) for ``backbone`` (SD or flow)."""
    if is_flow_model(backbone):
        clf = FlowMatchingClassifier(backbone, captions, schedule=[(n_timesteps, 1)], loss=loss, weighting=weighting,
                                     timesteps=timesteps, seed=seed, batch_size=batch_size)
        return clf, clf.grid(n_timesteps)
    if weighting not in (None, "none"):
        raise ValueError(f"weighting {weighting!r} is an SD3 flow-matching loss weighting; SD backbones take None")
    if getattr(backbone, "tokenizer", None) is not None:
        warn_long_captions([c for c in captions if c], backbone.tokenizer)  # the flow model warns when it encodes
    clf = DiffusionClassifier(backbone, captions, schedule=[(n_timesteps, 1)], loss=loss, seed=seed,
                              batch_size=batch_size)
    T = clf.num_train_timesteps
    if timesteps == "released":
        return clf, released_grid(n_timesteps, T, RELEASED_START_SD)
    if timesteps == "even":
        return clf, evenly_spaced(n_timesteps, T)
    raise ValueError(f"timesteps for SD backbones must be 'released' or 'even', got {timesteps!r}")


def item_errors(backbone: Any, images: Tensor, captions: Sequence[str], normalize: bool = False,
                **scorer: Any) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-timestep errors of every (caption, image) pair of one item.

    Args:
        images: (M, 3, H, W) in [0, 1].
        captions: C distinct captions (C = 1 allowed: an image-choice item).
        normalize: also score the empty caption, returned as ``uncond``.
        **scorer: ``n_timesteps``, ``timesteps``, ``loss``, ``weighting``, ``seed``, ``batch_size`` (:func:`make_scorer`).

    Returns:
        errors (C, M, S), uncond (M, S) or None, timestep positions (S,).
    """
    captions = list(captions)
    if len(set(captions)) != len(captions):
        raise ValueError(f"an item's captions must be distinct, got {captions}")
    extra = [""] if normalize or len(captions) < 2 else []
    clf, pos = make_scorer(backbone, captions + extra, **scorer)
    err = clf.pair_errors(images, timesteps=pos).permute(1, 0, 2)  # (C + extra, M, S)
    uncond = err[len(captions)] if normalize else None
    return err[: len(captions)], uncond, pos


@dataclass
class ErrorBank:
    """Saved per-timestep errors of a run: everything a metric or a weight fit needs, no model calls.

    Attributes:
        errors: one (C, M, S) tensor per item (captions x images x timesteps).
        uncond: one (M, S) tensor per item (empty-caption errors) or None.
        labels, kinds, subtasks, ids: per item (see :class:`~diffperc.data.compositional.CompositionalItem`).
        timesteps: (S,) positions of the timesteps (SD: the timesteps themselves).
        info: free-form run settings (task, model, loss, ...).
    """

    errors: list[Tensor] = field(default_factory=list)
    uncond: list[Tensor | None] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    subtasks: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    timesteps: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.errors)

    def add(self, errors: Tensor, uncond: Tensor | None, label: int, kind: str, subtask: str, id: str,
            timesteps: Tensor) -> None:
        if self.timesteps is None:
            self.timesteps = timesteps.clone()
        elif not torch.equal(self.timesteps, timesteps):
            raise ValueError("all items of an ErrorBank must be scored on the same timesteps")
        self.errors.append(errors.detach().float().cpu())
        self.uncond.append(None if uncond is None else uncond.detach().float().cpu())
        self.labels.append(int(label))
        self.kinds.append(kind)
        self.subtasks.append(subtask)
        self.ids.append(str(id))

    def save(self, path: str | Path) -> Path:
        """Atomic ``torch.save`` of plain tensors, lists and strings (loads with ``weights_only=True``)."""
        state = {"errors": self.errors, "uncond": [torch.empty(0) if u is None else u for u in self.uncond],
                 "labels": self.labels, "kinds": self.kinds, "subtasks": self.subtasks, "ids": self.ids,
                 "timesteps": self.timesteps, "info": {k: str(v) for k, v in self.info.items()}}
        with atomic_file(path) as tmp:
            torch.save(state, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ErrorBank:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"error bank {path} not found (written by CompositionalityTask or ErrorBank.save)")
        s = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"errors", "uncond", "labels", "kinds", "subtasks", "ids", "timesteps"} - set(s)
        if missing:
            raise ValueError(f"{path} is not an ErrorBank file (missing {sorted(missing)})")
        uncond = [None if u.numel() == 0 else u for u in s["uncond"]]
        return cls(s["errors"], uncond, s["labels"], s["kinds"], s["subtasks"], s["ids"], s["timesteps"],
                   s.get("info", {}))

    def subset(self, idx: Sequence[int]) -> ErrorBank:
        """The items at ``idx`` (fit / held-out splits)."""
        return ErrorBank([self.errors[i] for i in idx], [self.uncond[i] for i in idx], [self.labels[i] for i in idx],
                         [self.kinds[i] for i in idx], [self.subtasks[i] for i in idx], [self.ids[i] for i in idx],
                         self.timesteps, dict(self.info))

    def choice_matrix(self, normalize: bool = False) -> tuple[Tensor, Tensor]:
        """Every item as choices among candidates: errors (N', K, S) (NaN-padded) and labels (N',).

        A text item is one choice over its captions; an image item one over its images; a 2x2 item
        gives four (each image over the captions, each caption over the images), the directions
        of Winoground's text and image scores. ``normalize`` subtracts the empty-caption errors
        from image-direction choices (where stored).
        """
        rows: list[Tensor] = []
        labels: list[int] = []
        for e, u, lab, kind in zip(self.errors, self.uncond, self.labels, self.kinds, strict=True):
            img_dir = e - u[None] if normalize and u is not None else e  # (C, M, S)
            if kind == "text":
                rows.append(e[:, 0])
                labels.append(lab)
            elif kind == "image":
                rows.append(img_dir[0])
                labels.append(lab)
            else:
                rows += [e[:, 0], e[:, 1], img_dir[0], img_dir[1]]
                labels += [0, 1, 0, 1]
        if not rows:
            raise ValueError("the error bank is empty")
        K, S = max(r.shape[0] for r in rows), rows[0].shape[-1]
        out = torch.full((len(rows), K, S), float("nan"))
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out, torch.tensor(labels)


def _weighted(e: Tensor, w: Tensor | None) -> Tensor:
    """(..., S) -> (...) weighted mean over timesteps."""
    if w is None:
        return e.mean(-1)
    w = torch.as_tensor(w, dtype=e.dtype)
    if w.shape != e.shape[-1:]:
        raise ValueError(f"timestep weights must have shape ({e.shape[-1]},), got {tuple(w.shape)}")
    return (e * w).sum(-1) / w.sum()


def _strict_argmin(x: Tensor) -> int:
    """Index of the unique minimum, -1 on a tie (a tie counts as wrong)."""
    m = x.min()
    return int(x.argmin()) if int((x == m).sum()) == 1 else -1


def item_correct(errors: Tensor, uncond: Tensor | None, label: int, kind: str, weights: Tensor | None = None,
                 normalize: bool = False) -> dict[str, float]:
    """Correctness of one item: {"acc"} for text/image items, {"text", "image", "group"} for 2x2 items."""
    s = _weighted(errors, weights)  # (C, M)
    s_img = s - _weighted(uncond, weights)[None] if normalize and uncond is not None else s
    if kind == "text":
        return {"acc": float(_strict_argmin(s[:, 0]) == label)}
    if kind == "image":
        return {"acc": float(_strict_argmin(s_img[0]) == label)}
    text = bool(s[0, 0] < s[1, 0] and s[1, 1] < s[0, 1])
    image = bool(s_img[0, 0] < s_img[0, 1] and s_img[1, 1] < s_img[1, 0])
    return {"text": float(text), "image": float(image), "group": float(text and image)}


def task_metrics(bank: ErrorBank, weights: Tensor | None = None, normalize: bool = False) -> dict[str, dict[str, float]]:
    """Metrics (in %) per subtask and ``"all"``: accuracy, or text/image/group for 2x2 items; plus ``n``."""
    per: dict[str, list[dict[str, float]]] = defaultdict(list)
    for e, u, lab, kind, sub in zip(bank.errors, bank.uncond, bank.labels, bank.kinds, bank.subtasks, strict=True):
        c = item_correct(e, u, lab, kind, weights, normalize)
        per[sub].append(c)
        per["all"].append(c)
    out = {}
    for sub, rows in per.items():
        keys = sorted({k for r in rows for k in r})
        out[sub] = {k: 100.0 * sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
        out[sub]["n"] = float(len(rows))
    return out


def score_items(backbone: Any, batch: Sequence[dict[str, Any]], bank: ErrorBank, normalize: bool = False,
                **scorer: Any) -> None:
    """Score a batch of item dicts (:class:`~diffperc.data.compositional.CompositionalDataset`) into ``bank``."""
    for item in batch:
        err, unc, pos = item_errors(backbone, item["images"], item["captions"], normalize=normalize, **scorer)
        bank.add(err, unc, item["label"], item["kind"], item["subtask"], item["id"], pos)


_ORDER = ("acc", "text", "image", "group", "n")


def _rows(results: dict[str, dict[str, dict[str, float]]]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in _ORDER if any(k in m for sub in results.values() for m in sub.values())]
    rows = []
    for task, subs in results.items():
        for sub, m in subs.items():
            rows.append([task, sub] + [("" if k not in m else f"{m[k]:.0f}" if k == "n" else f"{m[k]:.2f}")
                                       for k in keys])
    return ["task", "subtask"] + keys, rows


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A Markdown table of ``{task: {subtask: metrics}}``."""
    head, rows = _rows(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def write_table(results: dict[str, dict[str, dict[str, float]]], stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` (atomically); returns both paths."""
    stem = Path(stem)
    head, rows = _rows(results)
    buf = io.StringIO()
    csv.writer(buf).writerows([head, *rows])
    return (write_text_atomic(stem.with_suffix(".csv"), buf.getvalue()),
            write_text_atomic(stem.with_suffix(".md"), format_table(results)))
