"""MLLM data in the released formats: LLaVA conversation JSON, MMVP, GQA (testdev-balanced).

- LLaVA (haotian-liu/LLaVA, docs/Data.md): a JSON list of ``{"id", "image": relative path,
  "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}``
  with the images under an image folder (stage 1: ``blip_laion_cc_sbu_558k.json``, stage 2:
  ``llava_v1_5_mix665k.json``). Samples without ``"image"`` (text-only) are skipped and counted.
- MMVP (tsb0601/MMVP, hf datasets/MMVP/MMVP): ``Questions.csv`` (Index, Question, Options,
  Correct Answer) and ``MMVP Images/{Index}.jpg``; the prompt is ``Question + " " + Options`` as in
  scripts/evaluate_mllm.py.
- GQA: ``{split}_questions.json`` (a dict question id -> {"imageId", "question", "answer", ...}) in
  the root or ``questions1.2/``, images in ``images/{imageId}.jpg``; LLaVA-1.5 appends "Answer the
  question using a single word or phrase.".

Images are padded to a square with the CLIP mean colour (LLaVA-1.5's ``image_aspect_ratio="pad"``),
resized to ``image_size`` and returned as (3, S, S) floats in [0, 1]; every tower resizes again.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["GQADataset", "LlavaConversationDataset", "MLLMDataModule", "MMVPDataset", "collate", "load_image"]

_PAD_RGB = (122, 116, 104)  # round(255 * OPENAI_CLIP_MEAN), as LLaVA's expand2square
GQA_SUFFIX = "\nAnswer the question using a single word or phrase."


def load_image(path: Path, image_size: int, pad_to_square: bool = True) -> Tensor:
    """An image file -> (3, S, S) float32 in [0, 1]; a missing or corrupt file names its path."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    if pad_to_square and img.width != img.height:
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), _PAD_RGB)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    img = img.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected {what}")
    return path


class LlavaConversationDataset(Dataset):
    """LLaVA conversation JSON -> ``{"image": (3, S, S), "conversations": list, "id": str}``.

    Args:
        json_path: the LLaVA JSON file.
        image_folder: folder the ``"image"`` paths are relative to.
        image_size: side S.
        limit: keep the first ``limit`` samples (None: all).
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path, image_size: int = 336,
                 limit: int | None = None) -> None:
        path = _need(Path(json_path), "a LLaVA conversation JSON list")
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(items, list):
            raise ValueError(f"{path} must hold a JSON list of samples, got {type(items).__name__}")
        self.folder = _need(Path(image_folder), "the image folder of the LLaVA JSON")
        self.samples = [s for s in items if "image" in s]
        self.skipped_text_only = len(items) - len(self.samples)
        for s in self.samples[:1]:
            if "conversations" not in s:
                raise ValueError(f"{path}: samples need 'conversations', got keys {sorted(s)}")
        self.samples = self.samples[:limit] if limit else self.samples
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {"image": load_image(self.folder / s["image"], self.image_size), "conversations": s["conversations"],
                "id": str(s.get("id", i))}


class MMVPDataset(Dataset):
    """MMVP -> ``{"image", "question", "options", "answer", "question_id", "benchmark": "mmvp"}``."""

    def __init__(self, root: str | Path, image_size: int = 336, limit: int | None = None) -> None:
        root = Path(root)
        csv_path = _need(root / "Questions.csv", "MMVP's Questions.csv (Index, Question, Options, Correct Answer)")
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        need = {"Index", "Question", "Options", "Correct Answer"}
        if rows and not need <= set(rows[0]):
            raise ValueError(f"{csv_path} needs columns {sorted(need)}, got {sorted(rows[0])}")
        self.rows = rows[:limit] if limit else rows
        self.images = _need(root / "MMVP Images", "the folder 'MMVP Images' with 1.jpg ... 300.jpg")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        return {"image": load_image(self.images / f"{int(r['Index'])}.jpg", self.image_size),
                "question": f"{r['Question']} {r['Options']}", "options": r["Options"],
                "answer": r["Correct Answer"], "question_id": int(r["Index"]), "benchmark": "mmvp"}


class GQADataset(Dataset):
    """GQA questions -> ``{"image", "question", "answer", "question_id", "benchmark": "gqa"}``."""

    def __init__(self, root: str | Path, split: str = "testdev_balanced", image_size: int = 336,
                 limit: int | None = None) -> None:
        root = Path(root)
        name = f"{split}_questions.json"
        path = next((p for p in (root / name, root / "questions1.2" / name) if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"{root} has no {name} (looked in the root and questions1.2/): expected GQA's "
                                    "released question file")
        questions = json.loads(path.read_text())
        self.items = sorted(questions.items())[:limit] if limit else sorted(questions.items())
        self.images = _need(root / "images", "GQA's images/ folder ({imageId}.jpg)")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        qid, q = self.items[i]
        return {"image": load_image(self.images / f"{q['imageId']}.jpg", self.image_size),
                "question": q["question"] + GQA_SUFFIX, "answer": q["answer"], "question_id": qid,
                "benchmark": "gqa"}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; keep every other field as a list (conversations, questions, ids)."""
    out: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
    for key in items[0]:
        if key != "image":
            out[key] = [it[key] for it in items]
    return out


class MLLMDataModule(LightningDataModule):
    """LLaVA training JSON (fit / validate) and an evaluation benchmark (test / predict).

    Args:
        train_json, image_folder: LLaVA stage-1 or stage-2 JSON and its image folder.
        val_json: a held-out LLaVA JSON (same image folder) for validation loss; None: no validation.
        benchmark: ``"mmvp"`` or ``"gqa"`` for test / predict, with ``benchmark_root``.
        gqa_split: GQA split name (``testdev_balanced``).
        image_size: side of the images handed to the towers (336 = CLIP ViT-L/14-336).
        batch_size, num_workers: DataLoader options; limit: at most this many samples per set.
    """

    def __init__(self, train_json: str | None = None, image_folder: str | None = None, val_json: str | None = None,
                 benchmark: str | None = None, benchmark_root: str | None = None,
                 gqa_split: str = "testdev_balanced", image_size: int = 336, batch_size: int = 16,
                 num_workers: int = 0, limit: int | None = None) -> None:
        super().__init__()
        if benchmark not in (None, "mmvp", "gqa"):
            raise ValueError(f"benchmark must be 'mmvp', 'gqa' or None, got {benchmark!r}")
        self.save_hyperparameters()
        self.sets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in (None, "fit", "validate"):
            if h.train_json is None or h.image_folder is None:
                raise ValueError("fit needs data.train_json and data.image_folder (a LLaVA JSON and its images)")
            self.sets["train"] = LlavaConversationDataset(h.train_json, h.image_folder, h.image_size, h.limit)
            if h.val_json:
                self.sets["val"] = LlavaConversationDataset(h.val_json, h.image_folder, h.image_size, h.limit)
        if stage in (None, "test", "predict"):
            if h.benchmark is None or h.benchmark_root is None:
                raise ValueError("test needs data.benchmark ('mmvp' or 'gqa') and data.benchmark_root")
            self.sets["test"] = (MMVPDataset(h.benchmark_root, h.image_size, h.limit) if h.benchmark == "mmvp"
                                 else GQADataset(h.benchmark_root, h.gqa_split, h.image_size, h.limit))

    def _loader(self, key: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.sets[key], batch_size=self.hparams.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False) if "val" in self.sets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
