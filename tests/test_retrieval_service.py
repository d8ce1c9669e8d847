"""The HTTP service, run for real: `python -m diffperc.retrieval.cli serve` on a free loopback port.

Checks a search hit, bearer auth (401), 413, 400 (not an image, truncated, decompression
bomb), 422 (k), that references acknowledged with 201 survive SIGKILL + restart, and that
concurrent searches and adds all succeed.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from retrieval_helpers import bomb_png, png_bytes, write_images

for _module, _package, _extra in (("faiss", "faiss-cpu", "retrieval"), ("fastapi", "fastapi", "retrieval"),
                                  ("uvicorn", "uvicorn", "retrieval"), ("multipart", "python-multipart", "retrieval"),
                                  ("httpx", "httpx", "dev")):
    pytest.importorskip(_module, reason=f"the service tests need {_package}: pip install -e '.[{_extra}]'",
                        exc_type=ImportError)

import httpx  # noqa: E402

from diffperc.retrieval.cli import build_index  # noqa: E402
from diffperc.retrieval.service import serve  # noqa: E402

TOKEN = "s3cret-token"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``diffperc serve`` in a subprocess on 127.0.0.1:<free port>; ``client`` talks HTTP to it."""

    def __init__(self, index_dir: Path, log: Path, token: str | None = TOKEN) -> None:
        self.index_dir, self.log, self.token = index_dir, log, token
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Server:
        self.port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("DIFFPERC_TOKEN", None)
        if self.token:
            env["DIFFPERC_TOKEN"] = self.token
        cmd = [sys.executable, "-m", "diffperc.retrieval.cli", "serve", "--index", str(self.index_dir),
               "--port", str(self.port), "--max-upload-mb", "1", "--max-k", "50", "--log-level", "warning"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        pytest.fail(f"server did not answer /healthz within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.client.close()

    def stop(self) -> None:
        self.client.close()  # first: uvicorn's graceful shutdown waits for open connections
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service")
    write_images(root / "refs", 12)
    build_index(root / "refs", root / "idx", model="test_sd", err=io.StringIO())
    return root / "idx"


@pytest.fixture(scope="module")
def server(index_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(index_dir, tmp_path_factory.mktemp("log") / "server.log").start()
    yield srv
    srv.stop()


def _search(client: httpx.Client, data: bytes, k: int | str = 3, **kw) -> httpx.Response:
    return client.post("/v1/search", files={"image": ("q.png", data, "image/png")}, data={"k": str(k)}, **kw)


def test_search_hit_and_stats(server: Server, index_dir: Path) -> None:
    ref = (index_dir.parent / "refs" / "ref07.png").read_bytes()
    r = _search(server.client, ref, k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [set(h) for h in body["results"]] == [{"id", "score", "uri"}] * 3 and body["took_ms"] >= 0
    assert body["results"][0]["id"] == "ref07" and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    stats = server.client.get("/v1/stats").json()
    assert stats["embedder"]["model"] == "test_sd" and stats["references"] >= 12
    assert server.client.get("/openapi.json").json()["paths"]["/v1/search"]
    from diffperc.retrieval.embedder import OriginEmbedder, read_image

    vector = OriginEmbedder.from_config(index_dir).embed_pil([read_image(ref)])[0] * 3.0  # any scale
    r = server.client.post("/v1/search/vector", json={"vector": vector.tolist(), "k": 2})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "ref07"
    assert server.client.post("/v1/search/vector", json={"vector": [1.0, 2.0], "k": 2}).status_code == 422


def test_auth(server: Server) -> None:
    bare = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30)
    assert bare.get("/healthz").status_code == 200  # liveness never needs the token
    for path in ("/v1/stats", "/docs", "/openapi.json"):
        r = bare.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert _search(bare, png_bytes(0)).status_code == 401
    assert _search(bare, png_bytes(0), headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
    assert bare.delete("/v1/references/ref00", headers={"Authorization": "Basic abc"}).status_code == 401
    bare.close()
    assert server.client.get("/v1/references/ref00").status_code == 200  # nothing was deleted


def test_bad_input_then_still_serving(server: Server) -> None:
    big = _search(server.client, b"\0" * (2 * 2**20))  # limit is 1 MB
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    r = _search(server.client, b"this is text, not an image")
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    good = png_bytes(3)
    r = _search(server.client, good[: len(good) // 2])
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    r = _search(server.client, bomb_png())
    assert r.status_code == 400 and "decompression bomb" in r.json()["detail"]
    for k in (0, 51, "many"):
        assert _search(server.client, good, k=k).status_code == 422
    assert server.client.post("/v1/search", data={"k": "3"}).status_code == 422  # no image
    assert _search(server.client, good).status_code == 200  # still serving


def test_add_get_delete_reference(server: Server) -> None:
    img = png_bytes(100)
    r = server.client.post("/v1/references", files={"image": ("new.png", img, "image/png")},
                           data={"id": "added-1", "uri": "s3://bucket/new.png"})
    assert r.status_code == 201 and r.json()["id"] == "added-1" and len(r.json()["sha256"]) == 64
    assert server.client.post("/v1/references", files={"image": ("new.png", img, "image/png")},
                              data={"id": "added-1"}).status_code == 409
    hit = _search(server.client, img, k=1).json()["results"][0]
    assert hit == {"id": "added-1", "score": pytest.approx(1.0, abs=1e-4), "uri": "s3://bucket/new.png"}
    assert server.client.delete("/v1/references/added-1").status_code == 200
    assert server.client.delete("/v1/references/added-1").status_code == 404
    assert _search(server.client, img, k=1).json()["results"][0]["id"] != "added-1"


def test_concurrent_search_and_add(server: Server) -> None:
    def search(i: int) -> int:
        return _search(server.client, png_bytes(i % 5), k=5).status_code

    def add(i: int) -> int:
        return server.client.post("/v1/references", files={"image": (f"c{i}.png", png_bytes(1000 + i), "image/png")},
                                  data={"id": f"conc-{i}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        searches = [pool.submit(search, i) for i in range(40)]
        adds = [pool.submit(add, i) for i in range(10)]
        codes = [f.result() for f in searches], [f.result() for f in adds]
    assert codes == ([200] * 40, [201] * 10)
    for i in (0, 9):
        assert _search(server.client, png_bytes(1000 + i), k=1).json()["results"][0]["id"] == f"conc-{i}"


def test_refuses_public_bind_without_token(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFPERC_TOKEN", raising=False)
    with pytest.raises(ValueError, match="without a token"):
        serve(index_dir, host="0.0.0.0", port=1)


def test_acknowledged_adds_survive_sigkill(server: Server, index_dir: Path) -> None:
    """Last in this file: it kills the shared server and restarts it on the same index."""
    snapshots = sorted(p.name for p in index_dir.glob("snapshot-*.faiss"))
    before = server.client.get("/v1/stats").json()["references"]
    for i in range(5):
        r = server.client.post("/v1/references", files={"image": (f"k{i}.png", png_bytes(500 + i), "image/png")})
        assert r.status_code == 201 and r.json()["id"] == f"k{i}"  # id from the file name
    assert server.client.delete("/v1/references/ref00").status_code == 200
    server.kill9()  # no shutdown hook runs: only what was committed before each answer exists
    assert sorted(p.name for p in index_dir.glob("snapshot-*.faiss")) == snapshots  # nothing snapshotted since
    server.start()
    for i in range(5):
        hit = _search(server.client, png_bytes(500 + i), k=1).json()["results"][0]
        assert hit["id"] == f"k{i}" and hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert server.client.get("/v1/references/ref00").status_code == 404
    assert server.client.get("/v1/stats").json()["references"] == before + 5 - 1
