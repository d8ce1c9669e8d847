"""A durable FAISS index of origin embeddings with SQLite metadata (write-ahead) and atomic snapshots.

Retrieval for ID² (Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion
Models", ICML 2025): references are embedded once, queries are matched by cosine similarity
(inner product of unit vectors). The paper's evaluator builds a dense query x gallery matrix;
past ~10^5 references an index is needed (docs/retrieval.md says which one at which size).

An index folder holds:

- ``embedder.json`` (+ ``projection.safetensors``): the embedder; queries always use it.
- ``meta.sqlite``: one row per reference (``id``, ``uri``, ``sha256``, ``added_at``), its vector,
  and an operation log. Every add or delete is committed here (WAL, ``synchronous=FULL``)
  before it is applied to FAISS or acknowledged, so nothing acknowledged is lost in a crash.
- ``snapshot-<seq>.faiss``: the FAISS index after operation ``seq``, written to a temp file,
  fsynced and renamed. Opening loads the newest snapshot and replays the operations after it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_bytes_atomic
from ._sync import RWLock
from .base import DuplicateIdError, Hit, StorageFullError, check_add, is_disk_full

__all__ = ["DuplicateIdError", "Hit", "OriginIndex", "StorageFullError", "import_faiss"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS refs (fid INTEGER PRIMARY KEY AUTOINCREMENT, ref_id TEXT NOT NULL UNIQUE,
                                 uri TEXT, sha256 TEXT, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (fid INTEGER PRIMARY KEY, vec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, fid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SNAPSHOT_GLOB = "snapshot-*.faiss"
_log = logging.getLogger(__name__)


def import_faiss() -> Any:
    """``import faiss`` with an install hint."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("the retrieval index needs FAISS: pip install 'diffperc[retrieval]' "
                          "(or pip install faiss-cpu)") from err
    return faiss


class OriginIndex:
    """Cosine-similarity search over reference embeddings; thread-safe (concurrent searches, serialised writes).

    Use :meth:`create` for a new folder and :meth:`open` for an existing one.

    Args:
        folder: the index folder.
        snapshot_every: write a snapshot after this many operations (adds + deletes) since the
            last one; between snapshots the operation log in SQLite is the durable record.
    """

    def __init__(self, folder: str | os.PathLike, snapshot_every: int = 10_000) -> None:
        self.folder = Path(folder)
        self.snapshot_every = snapshot_every
        self.faiss = import_faiss()
        self._db_lock = threading.Lock()
        self._index_lock = RWLock()
        self._snap_lock = threading.Lock()
        self._db = sqlite3.connect(self.folder / "meta.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.settings: dict[str, Any] = json.loads(self._meta("settings") or "{}")
        self.index: Any = None
        self._applied_seq = 0
        self._snapshot_seq = 0
        self._snap_thread: threading.Thread | None = None  # the background snapshot, joined by close()
        self._closed = False
        self.snapshot_error: str | None = None  # why the last snapshot failed (None: it did not)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, folder: str | os.PathLike, dim: int, factory: str = "Flat", nprobe: int = 32,
               ef_search: int = 128, snapshot_every: int = 10_000) -> OriginIndex:
        """A new empty index in ``folder`` (created; must not hold an index already).

        Args:
            dim: embedding dimension D.
            factory: a FAISS ``index_factory`` string: ``"Flat"`` (exact, the default),
                ``"HNSW32"``, ``"IVF4096,Flat"``, ``"IVF4096,PQ64"``, ... Ids are kept by an
                ``IDMap2`` wrapper. Trained indexes are trained on the first vectors added.
            nprobe, ef_search: search-time settings of IVF (lists visited) and HNSW indexes.
        """
        folder = Path(folder)
        if (folder / "meta.sqlite").exists():
            raise FileExistsError(f"{folder} already holds an index: open it, or pick a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        faiss = import_faiss()
        try:
            base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"FAISS cannot build index_factory string {factory!r} for dim {dim}: "
                             f"{str(err).splitlines()[-1][:200]}. Examples: Flat, HNSW32, IVF1024,Flat, "
                             "IVF4096,PQ64 (PQ m must divide the dimension)") from err
        # IVF indexes store ids natively (and IDMap2 over IVF breaks on removal: IVF does not renumber);
        # everything else gets an IDMap2 so our ids survive.
        native = faiss.try_extract_index_ivf(base) is not None and not isinstance(base, faiss.IndexRefine)
        spec = factory if native or factory.startswith("IDMap") else f"IDMap2,{factory}"
        probe = base if spec == factory else faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        self = cls(folder, snapshot_every)
        self.settings = {"dim": dim, "factory": factory, "spec": spec, "metric": "inner_product",
                         "nprobe": nprobe, "ef_search": ef_search, "needs_training": not probe.is_trained,
                         "created_at": time.time()}
        with self._db_lock:
            self._set_meta("settings", json.dumps(self.settings))
        self.index = probe
        self._set_search_params()
        return self

    @classmethod
    def open(cls, folder: str | os.PathLike, snapshot_every: int = 10_000) -> OriginIndex:
        """Open an index folder: load the newest snapshot and replay the operations logged after it."""
        folder = Path(folder)
        if not (folder / "meta.sqlite").is_file():
            raise FileNotFoundError(f"{folder} is not an index folder (no meta.sqlite): build one with "
                                    "`diffperc index build --images DIR --out INDEX_DIR`")
        self = cls(folder, snapshot_every)
        if not self.settings:
            raise ValueError(f"{folder}/meta.sqlite has no settings: the index was never fully created; rebuild it")
        self._load()
        return self

    def _load(self) -> None:
        snaps = sorted(self.folder.glob(_SNAPSHOT_GLOB), key=lambda p: int(p.stem.split("-")[1]))
        try:  # only the newest: the log before it is trimmed, so an older one could miss operations
            self.index = self.faiss.read_index(str(snaps[-1])) if snaps else None
        except RuntimeError:  # unreadable (renames make this unlikely): rebuild from SQLite
            self.index = None
        if self.index is None:
            self._rebuild()
            return
        self._applied_seq = self._snapshot_seq = int(snaps[-1].stem.split("-")[1])
        self._set_search_params()
        if self._replay():
            self._try_snapshot()

    def _fresh_index(self) -> Any:
        return self.faiss.index_factory(self.settings["dim"], self.settings["spec"], self.faiss.METRIC_INNER_PRODUCT)

    def _rebuild(self) -> None:
        """No usable snapshot: build the index from the vectors of all live references."""
        self.index = self._fresh_index()
        self._set_search_params()
        seq = self._last_seq()
        with self._db_lock:
            rows = self._db.execute("SELECT fid, vec FROM vectors ORDER BY fid").fetchall()
        if rows:
            fids = np.array([r[0] for r in rows], dtype=np.int64)
            vecs = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            self._train_if_needed(vecs)
            self.index.add_with_ids(vecs, fids)
        self._applied_seq = seq
        if rows or seq:
            self._try_snapshot()

    def _replay(self) -> int:
        """Apply logged operations newer than the snapshot; returns how many."""
        with self._db_lock:
            ops = self._db.execute("SELECT seq, op, fid FROM ops WHERE seq > ? ORDER BY seq",
                                   (self._applied_seq,)).fetchall()
            vecs = dict(self._db.execute(
                "SELECT v.fid, v.vec FROM vectors v JOIN ops o ON o.fid = v.fid WHERE o.seq > ? AND o.op = 'add'",
                (self._applied_seq,)).fetchall())
        if vecs and not self.index.is_trained:
            self._train_if_needed(np.stack([np.frombuffer(v, dtype=np.float32) for v in vecs.values()]))
        pending: list[int] = []  # consecutive adds go to FAISS in one call

        def flush() -> None:
            if pending:
                vec = np.stack([np.frombuffer(vecs[f], dtype=np.float32) for f in pending])
                self.index.add_with_ids(vec, np.asarray(pending, dtype=np.int64))
                pending.clear()

        for _, op, fid in ops:
            if op == "add" and fid in vecs:  # absent: a later delete removed the vector
                pending.append(fid)
            elif op == "del":
                flush()
                self._remove_from_index(fid)
        flush()
        if ops:
            self._applied_seq = ops[-1][0]
        return len(ops)

    # ------------------------------------------------------------------ sqlite helpers
    def _meta(self, key: str) -> str | None:
        with self._db_lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _last_seq(self) -> int:
        """The newest operation number ever logged (AUTOINCREMENT keeps it after the log is trimmed)."""
        with self._db_lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'ops'").fetchone()
        return row[0] if row else 0

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ training
    def _train_if_needed(self, vectors: np.ndarray, train_size: int = 100_000) -> None:
        """Train an untrained index on (a random sample of) ``vectors``; errors say how many are needed."""
        if self.index.is_trained:
            return
        need = self._min_train_points()
        if len(vectors) < need:
            raise ValueError(f"index {self.settings['factory']!r} must be trained on at least {need} vectors before "
                             f"the first add, got {len(vectors)}: build with more references at once, or use "
                             "'Flat' (exact; best below ~100k references) or 'HNSW32' (no training)")
        if len(vectors) > train_size:
            vectors = vectors[np.random.default_rng(0).choice(len(vectors), train_size, replace=False)]
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def _min_train_points(self) -> int:
        """At least one training point per IVF list (FAISS' minimum) and 256 for a PQ codebook."""
        need = 1
        ivf = self.faiss.try_extract_index_ivf(self._fresh_index())
        if ivf is not None:
            need = max(need, ivf.nlist)
        if "PQ" in self.settings["factory"]:
            need = max(need, 256)
        return need

    # ------------------------------------------------------------------ writes
    def add(self, vectors: np.ndarray, ids: Sequence[str], uris: Sequence[str | None] | None = None,
            sha256s: Sequence[str | None] | None = None) -> list[int]:
        """Add references durably, then to FAISS; returns their internal ids.

        Args:
            vectors: (N, D) float32 unit vectors (from the index's embedder).
            ids: N unique reference ids (not yet in the index).
            uris, sha256s: per reference, where it lives and the sha256 of its file.

        Raises:
            DuplicateIdError: an id is already in the index (nothing is added).
        """
        vectors, uris, sha256s = check_add(vectors, ids, uris, sha256s, self.settings["dim"])
        n = len(ids)
        if not self.index.is_trained:
            with self._index_lock.write():
                self._train_if_needed(vectors)
        now = time.time()
        with self._db_lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                fids = []
                for i in range(n):
                    cur = self._db.execute("INSERT INTO refs(ref_id, uri, sha256, added_at) VALUES (?, ?, ?, ?)",
                                           (ids[i], uris[i], sha256s[i], now))
                    fids.append(cur.lastrowid)
                self._db.executemany("INSERT INTO vectors(fid, vec) VALUES (?, ?)",
                                     [(f, vectors[i].tobytes()) for i, f in enumerate(fids)])
                self._db.executemany("INSERT INTO ops(op, fid) VALUES ('add', ?)", [(f,) for f in fids])
                last_seq = self._db.execute("SELECT MAX(seq) FROM ops").fetchone()[0]
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as err:
                self._rollback()
                dup = [i for i in ids if self._db.execute("SELECT 1 FROM refs WHERE ref_id = ?", (i,)).fetchone()]
                raise DuplicateIdError(f"reference id(s) already in the index: {dup[:5]}") from err
            except BaseException as err:
                self._rollback()
                if is_disk_full(err):
                    raise StorageFullError(f"disk full: {n} reference(s) not added ({err}); free space in "
                                           f"{self.folder}") from err
                raise
            with self._index_lock.write():  # under the db lock: FAISS applies ops in log order
                self.index.add_with_ids(vectors, np.asarray(fids, dtype=np.int64))
                self._applied_seq = last_seq
        self._maybe_snapshot()
        return fids

    def remove(self, ref_id: str) -> bool:
        """Delete a reference (durably first); False if there is no such id."""
        with self._db_lock:
            row = self._db.execute("SELECT fid FROM refs WHERE ref_id = ?", (ref_id,)).fetchone()
            if row is None:
                return False
            fid = row[0]
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM refs WHERE fid = ?", (fid,))
                self._db.execute("DELETE FROM vectors WHERE fid = ?", (fid,))
                seq = self._db.execute("INSERT INTO ops(op, fid) VALUES ('del', ?)", (fid,)).lastrowid
                self._db.execute("COMMIT")
            except BaseException as err:
                self._rollback()
                if is_disk_full(err):
                    raise StorageFullError(f"disk full: {ref_id!r} not removed ({err}); free space in "
                                           f"{self.folder}") from err
                raise
            with self._index_lock.write():
                self._remove_from_index(fid)
                self._applied_seq = seq
        self._maybe_snapshot()
        return True

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.OperationalError:  # SQLite already rolled back (e.g. after SQLITE_FULL)
            pass

    def _remove_from_index(self, fid: int) -> None:
        """Remove from FAISS where that is exact; elsewhere (HNSW, refine) leave a tombstone, filtered at search."""
        faiss = self.faiss
        index = faiss.downcast_index(self.index)
        if isinstance(index, faiss.IndexIDMap2):
            # IDMap2 renumbers its map after a removal; only flat-code sub-indexes renumber the same way
            if not isinstance(faiss.downcast_index(index.index), faiss.IndexFlatCodes):
                return
        elif faiss.try_extract_index_ivf(index) is None:
            return
        index.remove_ids(np.array([fid], dtype=np.int64))

    # ------------------------------------------------------------------ reads
    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` most similar live references of each query vector (Q, D), best first."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.settings["dim"]:
            raise ValueError(f"query vectors have dimension {vectors.shape[1]}, the index {self.settings['dim']}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.index.ntotal == 0:
            return [[] for _ in vectors]
        live_count = self.count()  # outside the index lock: writers take the db lock first
        with self._index_lock.read():
            extra = max(0, self.index.ntotal - live_count)  # HNSW tombstones that may rank high
            fetch = min(k + extra, max(self.index.ntotal, 1))
            scores, fids = self.index.search(vectors, fetch)
        live = self._lookup({int(f) for f in fids.ravel() if f >= 0})
        results = []
        for row_s, row_f in zip(scores, fids, strict=True):
            hits = [Hit(live[int(f)][0], float(s), live[int(f)][1]) for s, f in zip(row_s, row_f, strict=True)
                    if f >= 0 and int(f) in live]
            results.append(hits[:k])
        return results

    def _set_search_params(self) -> None:
        """Set nprobe / efSearch once, whenever ``self.index`` is (re)assigned (never during searches)."""
        ps = self.faiss.ParameterSpace()
        for name, key in (("nprobe", "nprobe"), ("efSearch", "ef_search")):
            try:
                ps.set_index_parameter(self.index, name, self.settings[key])
            except RuntimeError:
                pass  # not an IVF / HNSW index

    def _lookup(self, fids: set[int]) -> dict[int, tuple[str, str | None]]:
        if not fids:
            return {}
        marks = ",".join("?" * len(fids))
        with self._db_lock:
            rows = self._db.execute(f"SELECT fid, ref_id, uri FROM refs WHERE fid IN ({marks})", tuple(fids)).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def get(self, ref_id: str) -> dict[str, Any] | None:
        """Metadata of one reference: id, uri, sha256, added_at (UNIX time); None if absent."""
        with self._db_lock:
            row = self._db.execute("SELECT ref_id, uri, sha256, added_at FROM refs WHERE ref_id = ?",
                                   (ref_id,)).fetchone()
        return None if row is None else dict(zip(("id", "uri", "sha256", "added_at"), row, strict=True))

    def count(self) -> int:
        """Number of live references."""
        with self._db_lock:
            return self._db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        """References, FAISS size, settings, snapshot state and disk use."""
        last_seq = self._last_seq()
        files = [p for p in self.folder.iterdir() if p.is_file()]
        return {"references": self.count(), "faiss_ntotal": int(self.index.ntotal), "dim": self.settings["dim"],
                "factory": self.settings["factory"], "metric": "cosine (inner product of unit vectors)",
                "nprobe": self.settings["nprobe"], "ef_search": self.settings["ef_search"],
                "snapshot_seq": self._snapshot_seq, "last_seq": last_seq,
                "ops_since_snapshot": last_seq - self._snapshot_seq, "snapshot_error": self.snapshot_error,
                "disk_bytes": sum(p.stat().st_size for p in files)}

    # ------------------------------------------------------------------ snapshots
    def _maybe_snapshot(self) -> None:
        if (not self._closed and self._applied_seq - self._snapshot_seq >= self.snapshot_every
                and not self._snap_lock.locked()):
            self._snap_thread = threading.Thread(target=self._try_snapshot, name="index-snapshot", daemon=True)
            self._snap_thread.start()

    def _try_snapshot(self) -> Path | None:
        """:meth:`snapshot`, but a failed write (a full disk) is logged, not raised: the operation log in
        SQLite still holds everything, so opening and closing go on (``stats()["snapshot_error"]``)."""
        try:
            path = self.snapshot()
        except (OSError, sqlite3.OperationalError) as err:
            self.snapshot_error = f"{type(err).__name__}: {err}"
            _log.warning("index snapshot failed, the operation log keeps every change: %s", self.snapshot_error)
            return None
        self.snapshot_error = None
        return path

    def snapshot(self) -> Path | None:
        """Write the FAISS index to ``snapshot-<seq>.faiss`` atomically, then drop older snapshots and log."""
        with self._snap_lock:
            with self._index_lock.read():  # writers wait; searches continue
                seq = self._applied_seq
                if seq == self._snapshot_seq and any(self.folder.glob(_SNAPSHOT_GLOB)):
                    return None
                data = self.faiss.serialize_index(self.index)
            path = write_bytes_atomic(self.folder / f"snapshot-{seq:012d}.faiss", data.tobytes(), durable=True)
            self._snapshot_seq = seq
            for old in self.folder.glob(_SNAPSHOT_GLOB):
                if old != path:
                    old.unlink(missing_ok=True)
            with self._db_lock:
                self._db.execute("DELETE FROM ops WHERE seq <= ?", (seq,))
            return path

    def close(self, snapshot: bool = True) -> None:
        """Snapshot pending operations (unless ``snapshot=False``) and close SQLite.

        A background snapshot still running is waited for first, so it never writes to a closed database."""
        self._closed = True
        thread = self._snap_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if snapshot and self.index is not None:
            self._try_snapshot()
        with self._db_lock:
            self._db.close()
