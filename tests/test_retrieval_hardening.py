"""Service hardening that needs the inside of the process: a full disk, the decode cap, ids, vectors, tokens.

The black-box checks (slow clients, ids, k, vectors, both backends) are in test_retrieval_service.py.
A full disk is simulated: SQLite's own error (``database or disk is full``) from the connection, and
``OSError(ENOSPC)`` from the snapshot writer (no tmpfs can be mounted here).
"""

from __future__ import annotations

import errno
import io
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from retrieval_helpers import png_bytes, write_images

for _module, _package in (("faiss", "faiss-cpu"), ("fastapi", "fastapi"), ("multipart", "python-multipart"),
                          ("httpx", "httpx")):
    pytest.importorskip(_module, reason=f"the service tests need {_package}: pip install -e '.[dev]'",
                        exc_type=ImportError)

from fastapi.testclient import TestClient  # noqa: E402

from diffperc.retrieval import index as index_module  # noqa: E402
from diffperc.retrieval import service  # noqa: E402
from diffperc.retrieval.base import StorageFullError, check_ref_id, unit_rows  # noqa: E402
from diffperc.retrieval.cli import build_index  # noqa: E402
from diffperc.retrieval.index import OriginIndex  # noqa: E402


class _FullDisk:
    """Wraps a sqlite3 connection: every write statement fails as SQLite does when the disk is full."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args):
        if sql.lstrip().upper().startswith(("INSERT", "DELETE", "UPDATE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args):
        raise sqlite3.OperationalError("database or disk is full")

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    write_images(root / "refs", 6)
    build_index(root / "refs", root / "idx", model="test_sd", err=io.StringIO())
    return root / "idx"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _add(client: TestClient, seed: int, ref_id: str):
    return client.post("/v1/references", files={"image": ("x.png", png_bytes(seed), "image/png")}, data={"id": ref_id})


def test_full_disk_during_add_answers_507(built: Path, tmp_path: Path) -> None:
    index = OriginIndex.open(_copy(built, tmp_path / "idx"))
    with TestClient(service.create_app(index)) as client:
        before = client.get("/v1/stats").json()["references"]
        real = index._db
        index._db = _FullDisk(real)
        r = _add(client, 1, "on-full-disk")
        assert r.status_code == 507 and "disk full" in r.json()["detail"] and "retry" in r.json()["detail"]
        assert client.delete("/v1/references/ref00").status_code == 507
        assert client.post("/v1/search", files={"image": ("q.png", png_bytes(2), "image/png")}).status_code == 200
        index._db = real  # space is back
        assert client.get("/v1/references/on-full-disk").status_code == 404  # the failed add left nothing
        assert client.get("/v1/references/ref00").status_code == 200  # the failed delete neither
        assert _add(client, 1, "on-full-disk").status_code == 201
        assert client.get("/v1/stats").json()["references"] == before + 1


def test_restart_on_a_full_disk_starts_and_serves(built: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Adds logged but never snapshotted (a SIGKILL), then a restart on a full disk: the start-up snapshot
    fails, the service still starts from the log and answers searches; writes answer 507 while full."""
    folder = _copy(built, tmp_path / "idx")
    index = OriginIndex.open(folder)
    vecs = unit_rows(np.random.default_rng(0).standard_normal((3, index.settings["dim"])), index.settings["dim"])
    index.add(vecs, ["p0", "p1", "p2"])
    del index  # no close(): only SQLite holds the three adds
    monkeypatch.setattr(index_module, "write_bytes_atomic", _no_space)
    reopened = OriginIndex.open(folder)  # replays the log; its snapshot fails with ENOSPC
    assert reopened.snapshot_error is not None and "No space" in reopened.snapshot_error
    assert reopened.search(vecs[1], k=1)[0][0].id == "p1"
    with TestClient(service.create_app(reopened)) as client:
        stats = client.get("/v1/stats").json()
        assert stats["references"] == 9 and "No space" in stats["snapshot_error"] and stats["ops_since_snapshot"] == 3
        r = client.post("/v1/search/vector", json={"vector": vecs[2].tolist(), "k": 1})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "p2"
        reopened._db = _FullDisk(reopened._db)
        assert _add(client, 3, "while-full").status_code == 507
        reopened._db = reopened._db._db
    # the shutdown snapshot failed too (still ENOSPC): nothing was lost, the log still has it all
    monkeypatch.undo()
    again = OriginIndex.open(folder)
    assert again.snapshot_error is None and again.count() == 9 and again.search(vecs[0], k=1)[0][0].id == "p0"
    again.close()


def test_decodes_are_capped(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 concurrent uploads, --max-decodes 2: never more than 2 images decoded at once, all still answered."""
    active, peak, lock = 0, 0, threading.Lock()
    real_read = service.read_image

    def slow_read(data: bytes, max_pixels: int):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.3)
            return real_read(data, max_pixels=max_pixels)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(service, "read_image", slow_read)
    index = OriginIndex.open(_copy(built, tmp_path / "idx"))

    def run(app, n: int) -> list[int]:
        with TestClient(app) as client, ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda i: client.post("/v1/search", files={
                "image": ("q.png", png_bytes(i), "image/png")}).status_code, range(n)))

    assert run(service.create_app(index, max_decodes=2), 8) == [200] * 8
    assert peak == 2
    active, peak = 0, 0  # without a tight cap the same load decodes more at once (the cap is what limits it)
    index = OriginIndex.open(tmp_path / "idx")
    assert run(service.create_app(index, max_decodes=8), 8) == [200] * 8
    assert peak > 2
    index = OriginIndex.open(tmp_path / "idx")
    monkeypatch.setattr(service, "read_image", lambda data, max_pixels: time.sleep(1.0) or real_read(data, max_pixels))
    codes = run(service.create_app(index, max_decodes=1, decode_wait=0.2), 3)  # one decodes, two give up
    assert sorted(codes) == [200, 503, 503]


def test_token_file_first_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFPERC_TOKEN", raising=False)
    path = tmp_path / "token.txt"
    path.write_text("  tok-123  \nsecond line is a comment\n")
    assert service.resolve_token(path) == "tok-123"
    path.write_text("tok-456")  # no newline at all
    assert service.resolve_token(path) == "tok-456"
    path.write_text("\nthe token after an empty first line\n")
    with pytest.raises(ValueError, match="first line"):
        service.resolve_token(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        service.resolve_token(tmp_path / "missing.txt")
    monkeypatch.setenv("DIFFPERC_TOKEN", "from-env")
    assert service.resolve_token(None) == "from-env"


def test_ids_and_vectors_rules() -> None:
    assert check_ref_id("a" * 256) == "a" * 256
    for bad, match in (("a/b", "'/'"), ("a" * 257, "256"), ("", "non-empty"), ("a\nb", "control")):
        with pytest.raises(ValueError, match=match):
            check_ref_id(bad)
    x = np.random.default_rng(1).standard_normal(8)
    expect = x / np.linalg.norm(x)
    for scale in (1e-30, 1e-300, 1.0, 1e20, 1e300):
        assert np.allclose(unit_rows(x * scale, 8)[0], expect, atol=1e-6)
    naive = (x * 1e-30).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        assert not np.isfinite(naive / np.linalg.norm(naive)).all()  # what float32 normalising gave
    for bad in ([np.nan] * 8, [np.inf] + [0.0] * 7, [0.0] * 8, [1.0] * 7):
        with pytest.raises(ValueError):
            unit_rows(bad, 8)


def test_index_add_refuses_bad_ids_and_reports_full_disk(tmp_path: Path) -> None:
    index = OriginIndex.create(tmp_path / "idx", 4)
    v = unit_rows(np.eye(4)[:1], 4)
    with pytest.raises(ValueError, match="'/'"):
        index.add(v, ["x/y"])
    real = index._db
    index._db = _FullDisk(real)
    with pytest.raises(StorageFullError, match="disk full"):
        index.add(v, ["ok"])
    index._db = real
    assert index.count() == 0 and index.add(v, ["ok"]) and index.count() == 1
    index.close()
