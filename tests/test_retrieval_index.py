"""OriginIndex (FAISS + SQLite write-ahead + snapshots) and the `diffperc index ...` command functions."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from retrieval_helpers import write_images

pytest.importorskip("faiss", reason="the retrieval index needs faiss-cpu: pip install -e '.[retrieval]'",
                    exc_type=ImportError)

from diffperc.retrieval import cli  # noqa: E402
from diffperc.retrieval.index import DuplicateIdError, OriginIndex  # noqa: E402


def _unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_search_finds_exact_match_and_survives_reopen(tmp_path: Path, factory: str) -> None:
    vecs = _unit(200)
    ids = [f"r{i}" for i in range(200)]
    index = OriginIndex.create(tmp_path / "idx", 16, factory=factory, nprobe=4)
    index.add(vecs, ids, uris=[f"file://{i}" for i in ids])
    hits = index.search(vecs[[3, 150]], k=3)
    assert [h[0].id for h in hits] == ["r3", "r150"]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5) and hits[0][0].uri == "file://r3"
    assert hits[0][0].score >= hits[0][1].score >= hits[0][2].score
    assert index.remove("r3") and not index.remove("r3")
    assert all(h.id != "r3" for h in index.search(vecs[3], k=5)[0])  # HNSW keeps a tombstone, filtered out
    index.close()
    again = OriginIndex.open(tmp_path / "idx")
    assert again.count() == 199
    assert again.search(vecs[150], k=1)[0][0].id == "r150"
    assert all(h.id != "r3" for h in again.search(vecs[3], k=5)[0])
    again.close()


def test_crash_without_close_replays_the_log(tmp_path: Path) -> None:
    """Adds and deletes committed to SQLite but never snapshotted are replayed on open."""
    vecs = _unit(30)
    index = OriginIndex.create(tmp_path / "idx", 16)
    index.add(vecs[:10], [f"a{i}" for i in range(10)])
    index.snapshot()
    index.add(vecs[10:30], [f"b{i}" for i in range(20)])
    index.remove("a0")
    # simulate SIGKILL: no close(), no snapshot; only the SQLite commits exist
    del index
    reopened = OriginIndex.open(tmp_path / "idx")
    assert reopened.count() == 29 and reopened.index.ntotal == 29
    assert reopened.search(vecs[25], k=1)[0][0].id == "b15"
    assert all(h.id != "a0" for h in reopened.search(vecs[0], k=3)[0])
    assert len(list((tmp_path / "idx").glob("snapshot-*.faiss"))) == 1  # replay wrote a new one, old removed
    reopened.close()


def test_missing_snapshot_rebuilds_from_sqlite(tmp_path: Path) -> None:
    vecs = _unit(12)
    index = OriginIndex.create(tmp_path / "idx", 16)
    index.add(vecs, [f"r{i}" for i in range(12)])
    index.close()
    for snap in (tmp_path / "idx").glob("snapshot-*.faiss"):
        snap.unlink()
    rebuilt = OriginIndex.open(tmp_path / "idx")
    assert rebuilt.search(vecs[7], k=1)[0][0].id == "r7"
    rebuilt.close()


def test_duplicates_bad_dims_and_untrainable_factories_raise(tmp_path: Path) -> None:
    index = OriginIndex.create(tmp_path / "idx", 16)
    index.add(_unit(2), ["x", "y"])
    with pytest.raises(DuplicateIdError, match="already in the index"):
        index.add(_unit(1, seed=1), ["x"])
    assert index.count() == 2
    with pytest.raises(ValueError, match=r"must be \(1, 16\)"):
        index.add(_unit(1, d=8), ["z"])
    ivf = OriginIndex.create(tmp_path / "ivf", 16, factory="IVF64,Flat")
    with pytest.raises(ValueError, match="at least 64 vectors"):
        ivf.add(_unit(10), [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="index_factory"):
        OriginIndex.create(tmp_path / "bad", 16, factory="NotAnIndex")
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        OriginIndex.open(tmp_path / "nowhere")


# ---------------------------------------------------------------------------- command line
def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    import argparse

    parser = argparse.ArgumentParser(prog="diffperc")
    cli.add_parser(parser.add_subparsers(dest="command"))
    code = cli.run(parser.parse_args(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_build_add_query_stats(tmp_path: Path) -> None:
    refs = write_images(tmp_path / "refs", 6)
    (tmp_path / "refs" / "broken.png").write_bytes(b"not a png")
    idx = tmp_path / "idx"
    code, out, err = _run(["index", "build", "--images", str(tmp_path / "refs"), "--out", str(idx),
                           "--model", "test_sd"])
    assert code == 0, err
    assert "6 added" in out and "1 skipped unreadable" in out and "broken.png" in err
    assert "embed" in err  # progress bar
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx")]  # temp folder renamed away

    code, out, err = _run(["index", "query", "--index", str(idx), str(refs[4]), "-k", "3", "--json"])
    hits = json.loads(out)
    assert code == 0 and len(hits) == 3 and hits[0]["id"] == "ref04" and hits[0]["uri"] == str(refs[4].resolve())
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    more = write_images(tmp_path / "more", 8, seed=1)[6:]  # ref06, ref07 are new; ids from file stems
    write_images(tmp_path / "more_dupes", 2, seed=2)  # ref00, ref01 exist already
    code, out, _ = _run(["index", "add", "--index", str(idx), "--images", str(tmp_path / "more")])
    assert code == 0 and "2 added, 6 skipped existing" in out
    code, out, _ = _run(["index", "add", "--index", str(idx), "--images", str(tmp_path / "more_dupes")])
    assert code == 0 and "0 added" in out and "2 skipped existing" in out
    code, out, _ = _run(["index", "query", "--index", str(idx), str(more[1])])
    assert code == 0 and out.splitlines()[1].split()[2] == "ref07"

    code, out, _ = _run(["index", "stats", "--index", str(idx)])
    stats = json.loads(out)
    assert stats["references"] == 8  # 6 built + 2 new (ref06, ref07)
    assert stats["embedder"]["model"] == "test_sd" and stats["factory"] == "Flat"
    with sqlite3.connect(idx / "meta.sqlite") as db:
        rows = db.execute("SELECT ref_id, sha256, added_at FROM refs").fetchall()
    assert len(rows) == 8 and all(len(r[1]) == 64 and r[2] > 0 for r in rows)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    code, _, err = _run(["index", "query", "--index", str(tmp_path / "none"), "x.png"])
    assert code == 1 and "not an index folder" in err
    write_images(tmp_path / "refs", 2)
    code, _, err = _run(["index", "build", "--images", str(tmp_path / "refs"), "--out", str(tmp_path / "i"),
                         "--model", "test_sd", "--factory", "IVF64,Flat"])
    assert code == 1 and "at least 64 vectors" in err and not (tmp_path / "i").exists()
    code, _, err = _run(["index", "build", "--images", str(tmp_path / "refs"), "--out", str(tmp_path / "i"),
                         "--model", "no_such_model"])
    assert code == 1 and "no_such_model" in err


def test_close_waits_for_a_background_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot thread started by an add must finish before close() closes SQLite (it used to write to a
    closed database: sqlite3.ProgrammingError in the index-snapshot thread)."""
    import threading
    import time

    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    index = OriginIndex.create(tmp_path / "idx", 16)
    index.snapshot_every = 1
    slow = index.snapshot

    def snapshot_slowly() -> Path | None:
        time.sleep(0.3)  # close() is called while this runs
        return slow()

    monkeypatch.setattr(index, "snapshot", snapshot_slowly)
    index.add(_unit(5), [f"r{i}" for i in range(5)])
    assert index._snap_thread is not None and index._snap_thread.is_alive()
    index.close()
    assert not index._snap_thread.is_alive() and errors == []
    assert OriginIndex.open(tmp_path / "idx").count() == 5
