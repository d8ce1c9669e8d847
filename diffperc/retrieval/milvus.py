"""Reference index in a Milvus collection: Milvus Lite (a local file) or a Milvus standalone / distributed cluster.

The same face as the FAISS :class:`~diffperc.retrieval.index.OriginIndex` (see
:class:`~diffperc.retrieval.base.ReferenceIndex`), for origin identification past one machine
(ID², Wang et al., ICML 2025). The collection holds one entity per reference: ``id`` (VARCHAR
primary key, at most 256 characters), ``vector`` (FLOAT_VECTOR, unit length, COSINE), ``uri``,
``sha256`` and ``added_at`` (UNIX time). The index folder keeps what Milvus does not: the
embedder (``embedder.json``, ``projection.safetensors``) and ``milvus.json`` (URI, collection,
index type; never a token, which comes from ``$MILVUS_TOKEN``).

    --uri refs.db                 Milvus Lite, embedded in this process (one process at a time)
    --uri http://host:19530       Milvus standalone or distributed (many services may share it)

A write is acknowledged once Milvus has acknowledged it (in its write-ahead log). The
collection is created with ``consistency_level="Strong"``, so a search sees every add that was
acknowledged before it. Ids are unique within one service (checked under a lock before the
insert); several services writing the same ids at once to one cluster are not serialised.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_bytes_atomic
from .base import MAX_ID_LENGTH, DuplicateIdError, Hit, StorageFullError, check_add

__all__ = ["MilvusIndex", "import_pymilvus"]

_FIELDS = ["uri", "sha256", "added_at"]
_FULL_MARKERS = ("disk quota", "no space", "disk is full", "insufficient storage")


def import_pymilvus() -> Any:
    """``import pymilvus`` with an install hint."""
    try:
        import pymilvus
    except ImportError as err:
        raise ImportError("the milvus backend needs pymilvus (and milvus-lite for a local .db file): "
                          "pip install 'diffperc[milvus]'") from err
    return pymilvus


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _in_filter(ids: Sequence[str]) -> str:
    """A Milvus boolean expression matching these primary keys (JSON quoting: quotes and backslashes are safe)."""
    return "id in " + json.dumps(list(ids), ensure_ascii=False)


class MilvusIndex:
    """Cosine-similarity search over reference embeddings stored in a Milvus collection; thread-safe.

    Use :meth:`create` for a new index and :meth:`open` for an existing one.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict[str, Any], token: str | None = None) -> None:
        self.folder, self.settings = Path(folder), settings
        self.collection = settings["collection"]
        self._lock = threading.Lock()  # serialises check-then-insert and check-then-delete
        pymilvus = import_pymilvus()
        uri = settings["uri"]
        if _is_local(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = pymilvus.MilvusClient(uri=uri, token=token or "")
        except Exception as err:  # noqa: BLE001 - pymilvus raises many kinds; say where and why
            hint = " (pip install milvus-lite for a local .db file)" if _is_local(uri) else ""
            raise ConnectionError(f"cannot reach Milvus at {uri!r}{hint}: {type(err).__name__}: {err}") from err

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, folder: str | os.PathLike, dim: int, uri: str, collection: str = "origins",
               index_type: str = "AUTOINDEX", index_params: dict[str, Any] | None = None, nprobe: int = 32,
               ef_search: int = 128, overwrite: bool = False, token: str | None = None) -> MilvusIndex:
        """A new empty collection, recorded in ``folder/milvus.json``.

        Args:
            dim: embedding dimension D.
            uri: a Milvus Lite file (``refs.db``; made absolute) or ``http(s)://host:port``.
            collection: collection name (letters, digits and ``_``; must not exist unless ``overwrite``).
            index_type: ``AUTOINDEX`` (default: Milvus picks), ``FLAT``, ``IVF_FLAT``, ``HNSW``,
                ``IVF_SQ8``, ``IVF_PQ``, ``DISKANN``, ... (what the server supports).
            index_params: build parameters of that index (e.g. ``{"nlist": 4096}``, ``{"M": 32}``).
            nprobe, ef_search: search-time settings of IVF and HNSW indexes.
            overwrite: drop an existing collection of that name first.
        """
        if not collection.replace("_", "a").isalnum() or collection[0].isdigit():
            raise ValueError(f"collection name {collection!r} must be letters, digits and '_', not starting with a digit")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).expanduser().resolve()) if _is_local(uri) else uri
        settings = {"backend": "milvus", "uri": uri, "collection": collection, "dim": dim, "index_type": index_type,
                    "index_params": index_params or {}, "metric": "COSINE", "nprobe": nprobe,
                    "ef_search": ef_search, "created_at": time.time()}
        self = cls(folder, settings, token)
        if self.client.has_collection(collection):
            if not overwrite:
                raise FileExistsError(f"Milvus at {uri!r} already has a collection {collection!r}: pick another "
                                      "--collection, or --overwrite to drop it")
            self.client.drop_collection(collection)
        self._create_collection()
        write_bytes_atomic(folder / "milvus.json", json.dumps(settings, indent=2).encode(), durable=True)
        return self

    def _create_collection(self) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH * 4)  # bytes: 4 per char
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.settings["dim"])
        schema.add_field("uri", DataType.VARCHAR, max_length=16384, nullable=True)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64, nullable=True)
        schema.add_field("added_at", DataType.DOUBLE)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type=self.settings["index_type"], metric_type="COSINE",
                         params=self.settings["index_params"])
        self.client.create_collection(self.collection, schema=schema, index_params=params,
                                      consistency_level="Strong")

    @classmethod
    def open(cls, folder: str | os.PathLike, uri: str | None = None, token: str | None = None) -> MilvusIndex:
        """Open the collection recorded in ``folder/milvus.json`` (at ``uri`` instead, if given)."""
        path = Path(folder) / "milvus.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a milvus index folder (no milvus.json): build one with "
                                    "`diffperc index build --backend milvus --uri URI --images DIR --out DIR`")
        settings = json.loads(path.read_text())
        if uri is not None:
            settings["uri"] = str(Path(uri).expanduser().resolve()) if _is_local(uri) else uri
        self = cls(folder, settings, token)
        if not self.client.has_collection(self.collection):
            raise FileNotFoundError(f"Milvus at {settings['uri']!r} has no collection {self.collection!r} (recorded "
                                    f"in {path}): wrong --uri, or the collection was dropped; rebuild the index")
        fields = {f["name"]: f for f in self.client.describe_collection(self.collection)["fields"]}
        dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
        if dim != settings["dim"]:
            raise ValueError(f"collection {self.collection!r} has vectors of dimension {dim}, milvus.json says "
                             f"{settings['dim']}: it is not this index's collection")
        self.client.load_collection(self.collection)
        return self

    # ------------------------------------------------------------------ writes
    def _write_error(self, err: Exception, what: str) -> Exception:
        text = str(err).lower()
        if any(m in text for m in _FULL_MARKERS):
            return StorageFullError(f"Milvus refused the write, storage full: {what} ({err})")
        return err

    def add(self, vectors: np.ndarray, ids: Sequence[str], uris: Sequence[str | None] | None = None,
            sha256s: Sequence[str | None] | None = None) -> list[str]:
        """Insert references; returns their ids. Raises :class:`DuplicateIdError` if one exists (nothing added)."""
        vectors, uris, sha256s = check_add(vectors, ids, uris, sha256s, self.settings["dim"])
        n = len(ids)
        now = time.time()
        rows = [{"id": ids[i], "vector": vectors[i].tolist(), "uri": uris[i], "sha256": sha256s[i], "added_at": now}
                for i in range(n)]
        with self._lock:  # Milvus does not enforce unique primary keys: check first
            dup = self._existing(ids)
            if dup:
                raise DuplicateIdError(f"reference id(s) already in the index: {sorted(dup)[:5]}")
            try:
                self.client.insert(self.collection, rows)
            except Exception as err:  # noqa: BLE001
                raise self._write_error(err, f"{n} reference(s) not added") from err
        return list(ids)

    def remove(self, ref_id: str) -> bool:
        """Delete a reference; False if there is no such id."""
        with self._lock:
            if not self._existing([ref_id]):
                return False
            try:
                self.client.delete(self.collection, filter=_in_filter([ref_id]))
            except Exception as err:  # noqa: BLE001
                raise self._write_error(err, f"{ref_id!r} not removed") from err
        return True

    def _existing(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for s in range(0, len(ids), 1000):
            rows = self.client.query(self.collection, filter=_in_filter(ids[s : s + 1000]), output_fields=["id"])
            found.update(r["id"] for r in rows)
        return found

    # ------------------------------------------------------------------ reads
    def _search_params(self, k: int) -> dict[str, Any]:
        kind = self.settings["index_type"].upper()
        params: dict[str, Any] = {}
        if kind.startswith("IVF"):
            params["nprobe"] = self.settings["nprobe"]
        elif kind == "HNSW":
            params["ef"] = max(self.settings["ef_search"], k)
        return {"metric_type": "COSINE", "params": params}

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` most similar references of each query vector (Q, D), best first."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.settings["dim"]:
            raise ValueError(f"query vectors have dimension {vectors.shape[1]}, the index {self.settings['dim']}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        res = self.client.search(self.collection, data=vectors.tolist(), limit=k, output_fields=["uri"],
                                 search_params=self._search_params(k))
        return [[Hit(str(r["id"]), float(r["distance"]), r["entity"].get("uri")) for r in row] for row in res]

    def get(self, ref_id: str) -> dict[str, Any] | None:
        """Metadata of one reference: id, uri, sha256, added_at (UNIX time); None if absent."""
        rows = self.client.query(self.collection, filter=_in_filter([ref_id]), output_fields=["id", *_FIELDS])
        if not rows:
            return None
        return {"id": rows[0]["id"], **{f: rows[0].get(f) for f in _FIELDS}}

    def count(self) -> int:
        """Number of references."""
        return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def stats(self) -> dict[str, Any]:
        """References and the collection's settings."""
        s = self.settings
        return {"references": self.count(), "backend": "milvus", "uri": s["uri"], "collection": self.collection,
                "dim": s["dim"], "index_type": s["index_type"], "index_params": s["index_params"],
                "metric": "cosine (COSINE on unit vectors)", "nprobe": s["nprobe"], "ef_search": s["ef_search"]}

    def close(self, snapshot: bool = True) -> None:
        """Flush (unless ``snapshot=False``; Milvus persists acknowledged writes either way) and disconnect."""
        try:
            if snapshot:
                self.client.flush(self.collection)
        finally:
            self.client.close()
