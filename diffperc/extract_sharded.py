"""``diffperc extract --sharded``: the extract as a Lightning predict loop over GPUs and nodes.

Every rank (process) takes its own contiguous block of the sorted image list (no padding: the
default ``DistributedSampler`` repeats images to even out the ranks, so it is switched off with
``use_distributed_sampler=False``), runs the backbone on it and streams the features into one
shard file, ``OUT/shard-{rank:05d}-of-{world:05d}.safetensors`` (keys ``<name>/<layer>``, as
the one-file output), renamed into place when the rank is done. After a barrier, rank 0 writes
``OUT/index.json``: image relative path -> shard file and tensor keys.

``shard_size`` (``--shard-size``) > 0 makes a rank close its shard every that many images and
open the next (``-1``, ``-2`` ... suffixes), which bounds what a crash loses.

Resumable: a run first reads the headers of the complete shard files already in ``OUT`` (a
half-written shard is a hidden temporary file and is ignored, and removed by rank 0 before the
loop) and computes only the images in none of them; a shard whose name is taken gets a
``-1``, ``-2`` ... suffix. Options that change features (model, layers, size, seed, ...) must
match those of the shards already there. An image's features are those of the one-process
``diffperc extract`` (same per-image seed from its relative path, same code).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ._io import write_text_atomic
from .extract import (
    ExtractSummary,
    SafetensorsStream,
    _per_image,
    _prepare,
    _Run,
    forward_batch,
    image_name,
    read_image,
)
from .images import UnreadableImageError

__all__ = ["INDEX_NAME", "ShardWriter", "extract_features_sharded", "rank_split", "read_shards"]

INDEX_NAME = "index.json"
_FORMAT = "diffperc-extract-sharded/1"
_SETTINGS = ("model", "size", "resize", "seed", "layers", "compute_dtype", "save_dtype", "backbone_config")


def rank_split(items: list[str], rank: int, world: int) -> list[str]:
    """Rank ``rank``'s contiguous block of ``items``: every item in exactly one block, sizes differ by at most 1."""
    n = len(items)
    return items[rank * n // world : (rank + 1) * n // world]


def _settings(run: _Run) -> dict[str, str]:
    meta = run.metadata(run.rels[:1], {run.rels[0]: [0, 0]})
    return {k: meta[k] for k in _SETTINGS if k in meta} | {"save_dtype": str(run.store_dtype).removeprefix("torch.")}


def read_shards(out: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """The complete shard files of ``out``: image relative path -> (shard file name, that shard's metadata)."""
    from safetensors import safe_open

    done: dict[str, tuple[str, dict[str, str]]] = {}
    for file in sorted(out.glob("shard-*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - a damaged shard is recomputed, not fatal
            print(f"extract: ignoring unreadable shard {file.name} ({err}); its images are recomputed", file=sys.stderr)
            continue
        for rel in json.loads(meta.get("files", "[]")):
            done.setdefault(rel, (file.name, meta))
    return done


def _check_resumable(run: _Run, done: dict[str, tuple[str, dict[str, str]]], out: Path) -> None:
    """Refuse to add shards made with other settings or other prompts to ``out``."""
    want = _settings(run)
    for rel, (shard, meta) in done.items():
        have = json.loads(meta.get("run_settings", "{}"))
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise ValueError(f"{out / shard} was written with other settings ({', '.join(diff)}: "
                             f"{', '.join(f'{have.get(k)!r} there, {want[k]!r} now' for k in diff[:2])}): use the "
                             "same options to resume, or another --out")
        files, prompts = json.loads(meta["files"]), json.loads(meta.get("prompts") or "[]")
        prompt = prompts[files.index(rel)] if prompts else meta.get("prompt", "")
        if rel in run.prompts and prompt != run.prompts[rel]:
            raise ValueError(f"{rel} is in {out / shard} with the prompt {prompt!r}, now {run.prompts[rel]!r}: use "
                             "the same prompts to resume, or another --out")


class _Images(Dataset):
    """One rank's images: {"image": (3, S, S), "rel", "original"} or {"rel", "error"} for an unreadable one."""

    def __init__(self, run: _Run, rels: list[str], strict: bool) -> None:
        self.root, self.rels, self.size, self.resize, self.strict = run.root, rels, run.size, run.resize, strict

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rel = self.rels[i]
        try:
            image, original = read_image(self.root, rel, self.size, self.resize)
        except UnreadableImageError as e:
            if self.strict:
                raise UnreadableImageError(f"{e} (--strict stops at the first unreadable image)") from e
            return {"rel": rel, "error": str(e)}
        return {"image": image, "rel": rel, "original": original}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [it for it in items if "image" in it]
    return {"images": torch.stack([it["image"] for it in ok]) if ok else None, "rels": [it["rel"] for it in ok],
            "originals": [it["original"] for it in ok],
            "skipped": [(it["rel"], it["error"]) for it in items if "error" in it]}


class _Extractor(LightningModule):
    """The backbone's forward as a predict step; the data loader holds this rank's images not yet written."""

    def __init__(self, run: _Run, done: set[str], batch_size: int, num_workers: int, strict: bool) -> None:
        super().__init__()
        self.backbone = run.bb  # a submodule: Lightning moves it to this rank's device
        self.job, self.done = run, done
        self.batch_size, self.num_workers, self.strict = batch_size, num_workers, strict
        # on a resume a rank whose block is all written has nothing to do (Lightning refuses that by default)
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_dataloader(self) -> DataLoader:
        mine = rank_split(self.job.rels, self.trainer.global_rank, self.trainer.world_size)
        todo = [r for r in mine if r not in self.done]
        return DataLoader(_Images(self.job, todo, self.strict), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=_collate)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        feats = forward_batch(self.job, batch["images"], batch["rels"]) if batch["rels"] else []
        return {"rels": batch["rels"], "features": feats, "originals": batch["originals"],
                "skipped": batch["skipped"]}


class ShardWriter(BasePredictionWriter):
    """Streams each rank's features into ``out/shard-{rank:05d}-of-{world:05d}.safetensors`` (flat memory:
    tensors go to disk batch by batch; the file appears, complete, when the rank is done)."""

    def __init__(self, out: Path, run: _Run, shard_size: int = 0) -> None:
        super().__init__(write_interval="batch")
        self.out, self.run, self.shard_size = out, run, shard_size
        self.stream: SafetensorsStream | None = None
        self.summary = ExtractSummary(ignored=run.ignored)
        self.in_stream: list[str] = []  # images of the open shard
        self.originals: dict[str, list[int]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.global_rank == 0:  # leftovers of a run that died mid-shard; no rank writes before the barrier
            for tmp in self.out.glob(".shard-*"):
                tmp.unlink(missing_ok=True)
        trainer.strategy.barrier("diffperc_extract_clean")

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: dict[str, Any],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        for rel, reason in prediction["skipped"]:
            self.summary.skipped.append((rel, reason))
            print(f"extract (rank {trainer.global_rank}): skipped unreadable image {reason}", file=sys.stderr)
        if not prediction["rels"]:
            return
        if self.stream is None:
            self.stream = SafetensorsStream(self.out / f"shard-{trainer.global_rank:05d}.safetensors")
        for i, rel in enumerate(prediction["rels"]):
            for layer, t in _per_image(self.run, prediction["features"], i).items():
                self.stream.add(f"{image_name(rel)}/{layer}", t)
            self.originals[rel] = prediction["originals"][i]
        self.in_stream += prediction["rels"]
        self.summary.written += prediction["rels"]
        if self.shard_size and len(self.in_stream) >= self.shard_size:
            self._close(trainer)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(trainer)

    def _close(self, trainer: Trainer) -> None:
        """Finish the open shard: header + data under its final name (a complete file or none)."""
        if self.stream is None:
            return
        rank, world = trainer.global_rank, trainer.world_size
        meta = self.run.metadata(self.in_stream, self.originals)
        meta |= {"shard_rank": str(rank), "shard_world": str(world), "run_settings": json.dumps(_settings(self.run))}
        self.stream.path = _free_name(self.out, rank, world)
        self.summary.outputs.append(self.stream.close(meta))
        self.stream, self.in_stream, self.originals = None, [], {}

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.stream is not None:
            self.stream.abort()
            self.stream = None


def _free_name(out: Path, rank: int, world: int) -> Path:
    """``shard-{rank:05d}-of-{world:05d}.safetensors``, or with ``-1``, ``-2`` ... if a complete shard has it."""
    stem, n = f"shard-{rank:05d}-of-{world:05d}", 0
    while (out / (f"{stem}-{n}" if n else stem)).with_suffix(".safetensors").exists():
        n += 1
    return out / f"{stem}-{n}.safetensors" if n else out / f"{stem}.safetensors"


def write_index(out: Path) -> dict[str, Any]:
    """``out/index.json`` from the complete shards there: {"images": {rel: {"shard", "keys"}}, "shards", ...}."""
    done = read_shards(out)
    images, shards = {}, {}
    for rel, (shard, meta) in sorted(done.items()):
        layers = json.loads(meta["layers"])
        images[rel] = {"shard": shard, "keys": [f"{image_name(rel)}/{layer}" for layer in layers]}
        shards[shard] = shards.get(shard, 0) + 1
    first = next(iter(done.values()), (None, {}))[1]
    index = {"format": _FORMAT, "layers": json.loads(first.get("layers", "[]")),
             "settings": json.loads(first.get("run_settings", "{}")), "shards": dict(sorted(shards.items())),
             "images": images}
    write_text_atomic(out / INDEX_NAME, json.dumps(index, indent=1))
    return index


def _trainer_devices(devices: str | int) -> str | int:
    text = str(devices).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def extract_features_sharded(images_dir: str | os.PathLike, out: str | os.PathLike, model: str = "digits",
                             layers: str = "vpd", timestep: int | None = None, add_noise: bool | None = None,
                             ensemble_size: int = 1, prompt: str = "", prompt_file: str | os.PathLike | None = None,
                             size: int | None = None, resize: str = "stretch", recursive: bool = False,
                             batch_size: int = 8, torch_dtype: str | torch.dtype | None = None,
                             save_dtype: str | torch.dtype | None = None, seed: int = 0, strict: bool = False,
                             accelerator: str = "auto", devices: str | int = "auto", num_nodes: int = 1,
                             strategy: str = "auto", num_workers: int = 0, shard_size: int = 0,
                             err: TextIO | None = None) -> ExtractSummary:
    """:func:`diffperc.extract.extract_features` as a Lightning predict loop, one shard file per rank (see the
    module docstring for the layout and resuming). Same arguments, plus the Trainer's.

    Args:
        out: a folder (created): ``shard-*.safetensors`` + ``index.json``; read it with
            :func:`diffperc.extract.load_features`.
        accelerator, devices, num_nodes, strategy: Lightning ``Trainer`` arguments (``"gpu"``, ``8``, ``2``,
            ``"ddp"``). With several processes on one machine, Lightning re-runs the calling script in each
            (``diffperc extract`` handles that); under SLURM or torchrun each process runs it already.
        num_workers: data-loader processes reading images, per rank.
        shard_size: > 0: a rank closes its shard every ``shard_size`` images and opens the next
            (``shard-R-of-W-1.safetensors``, ``-2``, ...), so a crash loses at most that many images per
            rank; 0: one shard per rank per run.

    Returns:
        this rank's summary (images it wrote, unreadable ones it skipped, its shard file).
    """
    err = err or sys.stderr
    out = Path(out).expanduser()
    if out.suffix == ".safetensors" or (out.exists() and not out.is_dir()):
        raise ValueError(f"--sharded writes a folder of shards; --out {str(out)!r} must be a folder, not a file")
    if num_workers < 0 or shard_size < 0:
        raise ValueError(f"--num-workers and --shard-size must be >= 0, got {num_workers} and {shard_size}")
    run = _prepare(images_dir, model, layers, timestep, add_noise, ensemble_size, prompt, prompt_file, size, resize,
                   recursive, batch_size, "cpu", torch_dtype, save_dtype, seed)  # Lightning moves it to its device
    out.mkdir(parents=True, exist_ok=True)
    done = read_shards(out)  # every rank reads this before any rank can write (the process group is not up yet)
    _check_resumable(run, done, out)
    todo = [r for r in run.rels if r not in done]
    if done:
        print(f"extract: {len(run.rels) - len(todo)} of {len(run.rels)} images are already in {out}; computing the "
              f"other {len(todo)}", file=err)
    writer = ShardWriter(out, run, shard_size)
    trainer = Trainer(accelerator=accelerator, devices=_trainer_devices(devices), num_nodes=num_nodes,
                      strategy=strategy, logger=False, enable_checkpointing=False, enable_model_summary=False,
                      use_distributed_sampler=False, callbacks=[writer], default_root_dir=str(out))
    trainer.predict(_Extractor(run, set(done), batch_size, num_workers, strict), return_predictions=False)
    trainer.strategy.barrier("diffperc_extract_index")  # every shard is in place
    summary, rank = writer.summary, trainer.global_rank
    if summary.written:
        print(f"extract (rank {rank}): wrote the features of {len(summary.written)} images to "
              f"{', '.join(p.name for p in summary.outputs)}", file=err)
    if rank == 0:
        index = write_index(out)
        summary.total = len(index["images"])
        missing = len(run.rels) - len([r for r in run.rels if r in index["images"]])
        print(f"extract: {out} holds the features of {summary.total} images in {len(index['shards'])} shard(s) "
              f"(index: {INDEX_NAME})" + (f"; {missing} of the folder's images are not in it (unreadable: rerun "
                                          "to retry them)" if missing else ""), file=err)
        if not summary.total:
            print("extract: error: no image could be read; nothing was written", file=err)
    return summary
