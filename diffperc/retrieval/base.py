"""What every reference index of the retrieval service shares: the contract, id rules, errors, normalisation.

Two backends implement :class:`ReferenceIndex`: :class:`~diffperc.retrieval.index.OriginIndex`
(FAISS in the process, SQLite write-ahead; the default) and
:class:`~diffperc.retrieval.milvus.MilvusIndex` (a Milvus collection: Milvus Lite in a file, or a
Milvus standalone / distributed cluster). The service and the commands talk to either the same way.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["BACKENDS", "MAX_ID_LENGTH", "DuplicateIdError", "Hit", "ReferenceIndex", "StorageFullError",
           "check_ref_id", "detect_backend", "is_disk_full", "open_index", "unit_rows"]

MAX_ID_LENGTH = 256  # characters of a reference id (also the Milvus primary-key length)
BACKENDS = ("faiss", "milvus")


class DuplicateIdError(KeyError):
    """A reference id that is already in the index."""


class StorageFullError(OSError):
    """A write failed because the disk (or the database) is full; nothing was added or removed."""


@dataclass
class Hit:
    """One search result: reference id, cosine similarity, URI (path) of the reference."""

    id: str
    score: float
    uri: str | None


class ReferenceIndex(Protocol):
    """The face of a reference index that the service and the commands use."""

    folder: Path  # holds embedder.json (+ projection.safetensors)
    settings: dict[str, Any]  # at least "dim"

    def add(self, vectors: np.ndarray, ids: Sequence[str], uris: Sequence[str | None] | None = None,
            sha256s: Sequence[str | None] | None = None) -> list[Any]: ...
    def remove(self, ref_id: str) -> bool: ...
    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]: ...
    def get(self, ref_id: str) -> dict[str, Any] | None: ...
    def count(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self, snapshot: bool = True) -> None: ...


def check_ref_id(ref_id: str, source: str = "id") -> str:
    """Return ``ref_id`` if it is a valid reference id, else raise ``ValueError`` saying why.

    Valid: 1 to :data:`MAX_ID_LENGTH` characters, no ``/`` (an id is one path segment of
    ``/v1/references/{id}``), no control characters.

    Args:
        source: where the id came from, for the message ("id", "file name", ...).
    """
    if not isinstance(ref_id, str) or not ref_id:
        raise ValueError(f"reference {source} must be a non-empty string")
    if len(ref_id) > MAX_ID_LENGTH:
        raise ValueError(f"reference {source} {ref_id[:40]!r}... is {len(ref_id)} characters; the limit is "
                         f"{MAX_ID_LENGTH}: pass a shorter id")
    if "/" in ref_id:
        raise ValueError(f"reference {source} {ref_id!r} contains '/', which ids may not (an id is one path "
                         "segment of /v1/references/{id}): replace it, e.g. with ':' or '_'")
    if any(ord(c) < 32 or ord(c) == 127 for c in ref_id):
        raise ValueError(f"reference {source} {ref_id!r} contains control characters")
    return ref_id


def check_add(vectors: Any, ids: Sequence[str], uris: Sequence[str | None] | None,
              sha256s: Sequence[str | None] | None, dim: int) -> tuple[np.ndarray, list, list]:
    """Validate one add call of either backend: (N, dim) vectors as float32, N valid unique ids; returns
    (vectors, uris, sha256s) with missing uris/sha256s as None per reference."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(ids)
    if vectors.ndim != 2 or vectors.shape != (n, dim):
        raise ValueError(f"vectors must be ({n}, {dim}), got {vectors.shape}")
    for ref_id in ids:
        check_ref_id(ref_id)
    if len(set(ids)) != n:
        raise DuplicateIdError("ids repeat within one add call")
    return vectors, list(uris or [None] * n), list(sha256s or [None] * n)


def unit_rows(vectors: Any, dim: int) -> np.ndarray:
    """(Q, D) float32 unit vectors from any finite, non-zero (Q, D) or (D,) input, normalised in float64.

    Dividing by the largest magnitude first keeps a vector scaled by 1e-30 or 1e300 finite
    (float32 squares underflow below ~1e-19 and overflow above ~1e19).

    Raises:
        ValueError: wrong dimension, NaN or infinite entries, or an all-zero row.
    """
    x = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"vector must have {dim} numbers, got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("vector must be finite numbers: it contains NaN or infinity")
    peak = np.abs(x).max(axis=1, keepdims=True)
    if (peak == 0).any():
        raise ValueError("vector must not be all zero (it has no direction)")
    x = x / peak
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def is_disk_full(err: BaseException) -> bool:
    """True for errors that mean 'no space left': ENOSPC / EDQUOT, SQLite's SQLITE_FULL."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, sqlite3.Error):
        code = getattr(err, "sqlite_errorcode", None)
        return code == 13 or "database or disk is full" in str(err)  # 13 = SQLITE_FULL
    return False


def detect_backend(folder: str | Path) -> str | None:
    """``"milvus"`` (``milvus.json``), ``"faiss"`` (``meta.sqlite``) or None for a folder that holds no index."""
    folder = Path(folder)
    if (folder / "milvus.json").is_file():
        return "milvus"
    return "faiss" if (folder / "meta.sqlite").is_file() else None


def open_index(folder: str | Path, backend: str | None = None, uri: str | None = None,
               token: str | None = None) -> ReferenceIndex:
    """Open the index of ``folder`` with the backend it was built with.

    Args:
        backend: ``"faiss"`` or ``"milvus"``; None takes the folder's. A mismatch is an error.
        uri, token: Milvus only: reach the collection at another URI than the one recorded at build
            time (the same data served from another host), and its token (default ``$MILVUS_TOKEN``).
    """
    found = detect_backend(folder)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if found is None:
        raise FileNotFoundError(f"{folder} is not an index folder (no meta.sqlite or milvus.json): build one with "
                                "`diffperc index build --images DIR --out INDEX_DIR [--backend milvus --uri URI]`")
    if backend is not None and backend != found:
        raise ValueError(f"{folder} holds a {found} index, not {backend}: drop --backend, or build a {backend} "
                         f"index with `diffperc index build --backend {backend} ...`")
    if found == "milvus":
        from .milvus import MilvusIndex

        return MilvusIndex.open(folder, uri=uri, token=token)
    if uri is not None:
        raise ValueError("--uri is for the milvus backend; a FAISS index lives in its folder")
    from .index import OriginIndex

    return OriginIndex.open(folder)
