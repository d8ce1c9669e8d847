"""An on-disk cache of frozen-backbone features: computed once, read back on every later epoch or run.

A frozen backbone gives the same features for the same input every time, so small datasets (the
digits checks, a few thousand training images) pay the UNet only once. A :class:`FeatureCache` is a
folder per *setting* (model, taps, timestep, prompt, image size, noise seed, ...: whatever changes
the features), named by a hash of that setting, holding one safetensors file per *item*:

    <root>/<name>-<hash12>/key.json              the setting, for a reader
    <root>/<name>-<hash12>/<item>.safetensors    {tensor name: tensor}

Items are named by the caller (an image id, a prompt hash) or by :func:`tensor_key`, a hash of the
input tensor itself, so an augmented (e.g. flipped) image gets its own entry and a stale entry can
never be returned for a changed input. Files are written to a temporary name and renamed, so a crash
leaves no half file; a corrupt file raises naming its path and how to recover.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_file, write_text_atomic

__all__ = ["FeatureCache", "setting_hash", "tensor_key", "text_key"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"a FeatureCache setting must be JSON-like (str, number, bool, None, list, dict); "
                    f"got {type(value).__name__}: pass a string that identifies it instead")


def setting_hash(setting: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the setting's canonical JSON (sorted keys)."""
    text = json.dumps(_jsonable(setting), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def text_key(text: str) -> str:
    """A file-safe item name for a string (e.g. a prompt): 16 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_key(x: Tensor) -> str:
    """A file-safe item name for an input tensor: SHA-256 (16 hex) of its dtype, shape and bytes."""
    x = x.detach().contiguous().cpu()
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()[:16]


class FeatureCache:
    """Safetensors files of features, one folder per setting.

    Args:
        root: the cache folder (created on first write).
        setting: everything that determines the features (model id, layers, timestep, prompt,
            image size, seed, ...), JSON-like; a different setting gets a different folder.
        name: a readable prefix of the folder name (default ``"features"``).
    """

    def __init__(self, root: str | Path, setting: Mapping[str, Any], name: str = "features") -> None:
        if not name or any(c in name for c in "/\\"):
            raise ValueError(f"name must be a non-empty file name without slashes, got {name!r}")
        self.setting = _jsonable(dict(setting))
        self.folder = Path(root).expanduser() / f"{name}-{setting_hash(self.setting)}"
        self.hits = self.misses = 0

    def path(self, item: str) -> Path:
        if not item or any(c in item for c in "/\\") or item.startswith("."):
            raise ValueError(f"item must be a file name without slashes or a leading dot, got {item!r}")
        return self.folder / f"{item}.safetensors"

    def __contains__(self, item: str) -> bool:
        return self.path(item).is_file()

    def load(self, item: str) -> dict[str, Tensor] | None:
        """The tensors stored under ``item``, or None when it is not cached."""
        from safetensors.torch import load_file

        path = self.path(item)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            out = load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError (not exported)
            raise OSError(f"feature cache file {path} is corrupt ({err}); delete it (or the folder "
                          f"{self.folder}) and it is recomputed") from err
        self.hits += 1
        return out

    def save(self, item: str, tensors: Mapping[str, Tensor]) -> Path:
        """Store ``tensors`` (name -> tensor, moved to the CPU) under ``item`` atomically; returns the path."""
        from safetensors.torch import save_file

        if not tensors:
            raise ValueError(f"nothing to cache for item {item!r}: pass at least one tensor")
        path = self.path(item)
        if not (self.folder / "key.json").is_file():
            write_text_atomic(self.folder / "key.json", json.dumps(self.setting, indent=1, sort_keys=True) + "\n")
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        with atomic_file(path) as tmp:
            save_file(data, str(tmp))
        return path

    def get_or_compute(self, items: Sequence[str], compute: Callable[[list[int]], Sequence[Mapping[str, Tensor]]]
                       ) -> list[dict[str, Tensor]]:
        """Tensors of every item: cached ones read, the missing ones computed in one call and stored.

        Args:
            items: item names, one per input.
            compute: called once with the positions (into ``items``) of the missing inputs; returns one
                ``{name: tensor}`` per position, in that order.

        Returns:
            one ``{name: tensor}`` per item, in the order of ``items``.
        """
        out: list[dict[str, Tensor] | None] = [self.load(it) for it in items]
        missing = [i for i, o in enumerate(out) if o is None]
        if missing:
            fresh = list(compute(missing))
            if len(fresh) != len(missing):
                raise ValueError(f"compute returned {len(fresh)} results for {len(missing)} missing items")
            for i, tensors in zip(missing, fresh, strict=True):
                self.save(items[i], tensors)
                out[i] = {k: v.detach().cpu() for k, v in tensors.items()}
        return out  # type: ignore[return-value]
