"""MilvusIndex (a Milvus Lite file here; the same code talks to a Milvus cluster) and `index ... --backend milvus`."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
from retrieval_helpers import write_images

pytest.importorskip("milvus_lite", reason="the milvus backend tests need milvus-lite: pip install -e '.[milvus]'",
                    exc_type=ImportError)

from diffperc.retrieval import cli  # noqa: E402
from diffperc.retrieval.base import DuplicateIdError, open_index  # noqa: E402
from diffperc.retrieval.milvus import MilvusIndex  # noqa: E402


def _unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("index_type", ["FLAT", "IVF_FLAT", "HNSW"])
def test_add_search_remove_reopen(tmp_path: Path, index_type: str) -> None:
    vecs = _unit(60)
    ids = [f"r{i}" for i in range(59)] + ['it\'s "odd" \\ ü']  # quotes must not break Milvus' filter syntax
    params = {"nlist": 4} if index_type == "IVF_FLAT" else {"M": 8, "efConstruction": 32} if index_type == "HNSW" else {}
    index = MilvusIndex.create(tmp_path / "idx", 16, uri=str(tmp_path / "m.db"), index_type=index_type,
                               index_params=params, nprobe=4)
    index.add(vecs, ids, uris=[f"file://{i}" for i in ids], sha256s=["0" * 64] * 60)
    hits = index.search(vecs[[3, 59]], k=3)
    assert [h[0].id for h in hits] == ["r3", ids[59]]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5) and hits[0][0].uri == "file://r3"
    assert hits[0][0].score >= hits[0][1].score >= hits[0][2].score
    # scores are cosines, as in the FAISS backend
    assert hits[0][1].score == pytest.approx(float(vecs[3] @ vecs[int(hits[0][1].id[1:])]), abs=1e-5)
    meta = index.get(ids[59])
    assert meta["id"] == ids[59] and meta["sha256"] == "0" * 64 and meta["added_at"] > 0
    with pytest.raises(DuplicateIdError, match="already in the index"):
        index.add(_unit(1, seed=1), ["r1"])
    assert index.remove("r3") and not index.remove("r3") and index.get("r3") is None
    assert all(h.id != "r3" for h in index.search(vecs[3], k=5)[0])
    assert index.remove(ids[59])
    index.close()
    again = open_index(tmp_path / "idx")
    assert isinstance(again, MilvusIndex) and again.count() == 58
    assert again.search(vecs[40], k=1)[0][0].id == "r40"
    assert again.stats()["index_type"] == index_type
    again.close()


def test_errors(tmp_path: Path) -> None:
    uri = str(tmp_path / "m.db")
    index = MilvusIndex.create(tmp_path / "a", 16, uri=uri)
    with pytest.raises(ValueError, match=r"must be \(1, 16\)"):
        index.add(_unit(1, d=8), ["z"])
    with pytest.raises(ValueError, match="'/'"):
        index.add(_unit(1), ["a/b"])
    index.close()
    with pytest.raises(FileExistsError, match="already has a collection 'origins'"):
        MilvusIndex.create(tmp_path / "b", 16, uri=uri)
    with pytest.raises(ValueError, match="collection name"):
        MilvusIndex.create(tmp_path / "c", 16, uri=uri, collection="bad-name")
    with pytest.raises(ValueError, match="holds a milvus index, not faiss"):
        open_index(tmp_path / "a", backend="faiss")
    with pytest.raises(FileNotFoundError, match="no collection 'origins'"):
        open_index(tmp_path / "a", uri=str(tmp_path / "other.db"))


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    parser = argparse.ArgumentParser(prog="diffperc")
    cli.add_parser(parser.add_subparsers(dest="command"))
    code = cli.run(parser.parse_args(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_build_add_query_stats_on_milvus(tmp_path: Path) -> None:
    refs = write_images(tmp_path / "refs", 5)
    (tmp_path / "refs" / "bad\tname.png").write_bytes(refs[0].read_bytes())  # control character: skipped
    # (a file name cannot exceed 255 bytes here, so too-long ids are checked through uploads in the service tests)
    idx, db = tmp_path / "idx", tmp_path / "refs.db"
    code, out, err = _run(["index", "build", "--images", str(tmp_path / "refs"), "--out", str(idx),
                           "--model", "test_sd", "--backend", "milvus", "--uri", str(db)])
    assert code == 0, err
    assert "5 added" in out and "1 skipped bad id" in out and "control" in err
    assert json.loads((idx / "milvus.json").read_text())["uri"] == str(db.resolve())
    code, out, err = _run(["index", "query", "--index", str(idx), str(refs[2]), "-k", "2", "--json"])
    hits = json.loads(out)
    assert code == 0 and hits[0]["id"] == "ref02" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    more = write_images(tmp_path / "more", 7, seed=1)[5:]
    code, out, _ = _run(["index", "add", "--index", str(idx), "--images", str(tmp_path / "more")])
    assert code == 0 and "2 added, 5 skipped existing" in out
    code, out, _ = _run(["index", "query", "--index", str(idx), str(more[1])])
    assert code == 0 and out.splitlines()[1].split()[2] == "ref06"
    code, out, _ = _run(["index", "stats", "--index", str(idx)])
    stats = json.loads(out)
    assert stats["references"] == 7 and stats["backend"] == "milvus" and stats["embedder"]["model"] == "test_sd"
    code, _, err = _run(["index", "build", "--images", str(tmp_path / "refs"), "--out", str(tmp_path / "i2"),
                         "--model", "test_sd", "--backend", "milvus"])
    assert code == 1 and "needs --uri" in err and not (tmp_path / "i2").exists()
