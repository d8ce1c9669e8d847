"""The HTTP service, run for real: `python -m diffperc.retrieval.cli serve` on a free loopback port.

Every test runs against both backends: FAISS (the default) and Milvus (Milvus Lite, ``--uri
refs.db``; skipped when milvus-lite is not installed). Checks a search hit, bearer auth (401,
the token file's first line), 413, 400 (not an image, truncated, decompression bomb), 422 (k,
ids with "/" or too long, bad vectors), 408 for slow headers and bodies, that references
acknowledged with 201 survive SIGKILL + restart, and that concurrent searches and adds all succeed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import select
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
HEADER_TIMEOUT, BODY_TIMEOUT = 2.0, 3.0  # the test server's --header-timeout / --body-timeout
HAS_MILVUS = all(importlib.util.find_spec(m) is not None for m in ("pymilvus", "milvus_lite"))
BACKENDS = ["faiss", pytest.param("milvus", marks=pytest.mark.skipif(
    not HAS_MILVUS, reason="the milvus backend tests need pymilvus and milvus-lite: pip install -e '.[milvus]'"))]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``diffperc serve`` in a subprocess on 127.0.0.1:<free port>; ``client`` talks HTTP to it.

    The token is read from a token file whose first line is the token (a comment line follows).
    """

    def __init__(self, index_dir: Path, log: Path, backend: str = "faiss", token: str | None = TOKEN) -> None:
        self.index_dir, self.log, self.backend, self.token = index_dir, log, backend, token
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> Server:
        """Start and wait for /healthz: polls quickly at first, fails at once (with the log) if the process exits."""
        self.port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("DIFFPERC_TOKEN", None)
        cmd = [sys.executable, "-m", "diffperc.retrieval.cli", "serve", "--index", str(self.index_dir),
               "--backend", self.backend, "--port", str(self.port), "--max-upload-mb", "1", "--max-k", "50",
               "--log-level", "warning", "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)]
        if self.token:
            token_file = self.log.with_name("token.txt")
            token_file.write_text(f"{self.token}\n# the token is the first line; this line is not part of it\n")
            cmd += ["--token-file", str(token_file)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=30)
        start = time.monotonic()
        pause = 0.05
        while time.monotonic() - start < timeout:  # generous: a loaded machine can take a minute to import torch
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} during start-up:\n{self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(pause)
            pause = min(pause * 1.5, 1.0)
        self.proc.kill()
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


@pytest.fixture(scope="module", params=BACKENDS)
def index_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"service_{request.param}")
    write_images(root / "refs", 12)
    if request.param == "milvus":
        # Milvus Lite lets one process at a time open refs.db, and its embedded server lives until the
        # process that opened it exits: build in a child process, so the service can open it next.
        cmd = [sys.executable, "-m", "diffperc.cli", "index", "build", "--images", str(root / "refs"), "--out",
               str(root / "idx"), "--model", "test_sd", "--backend", "milvus", "--uri", str(root / "refs.db")]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        build_index(root / "refs", root / "idx", model="test_sd", err=io.StringIO())
    return root / "idx"


@pytest.fixture(scope="module")
def server(index_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    backend = "milvus" if (index_dir / "milvus.json").is_file() else "faiss"
    srv = Server(index_dir, tmp_path_factory.mktemp("log") / "server.log", backend=backend).start()
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

    vector = OriginEmbedder.from_config(index_dir).embed_pil([read_image(ref)])[0].astype("float64")
    for scale in (3.0, 1e-30, 1e20, 1e300):  # normalised in float64: float32 squares under/overflow at these
        r = server.client.post("/v1/search/vector", json={"vector": (vector * scale).tolist(), "k": 2})
        assert r.status_code == 200, (scale, r.text)
        assert r.json()["results"][0]["id"] == "ref07" and r.json()["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert server.client.post("/v1/search/vector", json={"vector": [1.0, 2.0], "k": 2}).status_code == 422
    raw = json.dumps({"vector": vector.tolist(), "k": 2})
    for bad in ("NaN", "Infinity", "-Infinity", "1e400"):  # JSON extensions Python parses, and an overflow
        body = raw.replace(repr(float(vector[5])), bad, 1)
        assert body != raw
        r = server.client.post("/v1/search/vector", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and ("finite" in r.text or "inf" in r.text.lower()), (bad, r.text)
    zero = server.client.post("/v1/search/vector", json={"vector": [0.0] * len(vector), "k": 2})
    assert zero.status_code == 422 and "zero" in zero.json()["detail"]


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


def test_ids_with_slash_or_too_long_are_refused(server: Server) -> None:
    """Ids are one path segment of /v1/references/{id}: '/' is refused (422), as is > 256 characters,
    whether the id comes from the form field or from the uploaded file's name."""
    img = png_bytes(200)
    before = server.client.get("/v1/stats").json()["references"]

    def add(filename: str, **data: str) -> httpx.Response:
        return server.client.post("/v1/references", files={"image": (filename, img, "image/png")}, data=data)

    r = add("x.png", id="a/b")
    assert r.status_code == 422 and "'/'" in r.json()["detail"]
    r = add("x.png", id="x" * 257)
    assert r.status_code == 422 and "256" in r.json()["detail"]
    r = add("y" * 300 + ".png")
    assert r.status_code == 422 and "file name" in r.json()["detail"] and "256" in r.json()["detail"]
    r = add("x.png", id="tab\there")
    assert r.status_code == 422 and "control" in r.json()["detail"]
    assert server.client.get("/v1/references/a/b").status_code == 404
    assert server.client.get("/v1/stats").json()["references"] == before  # nothing was added
    r = add("x.png", id="z" * 256)  # the limit itself is fine, and GET / DELETE work on it
    assert r.status_code == 201, r.text
    assert server.client.get("/v1/references/" + "z" * 256).json()["id"] == "z" * 256
    assert server.client.delete("/v1/references/" + "z" * 256).status_code == 200
    quoted = 'it\'s a "quoted" \\ id'  # quotes and backslashes must not break a backend's filter syntax
    assert add("x.png", id=quoted).status_code == 201
    assert server.client.get(f"/v1/references/{quoted}").json()["id"] == quoted
    assert server.client.delete(f"/v1/references/{quoted}").status_code == 200
    assert server.client.get(f"/v1/references/{quoted}").status_code == 404


def test_k_as_query_parameter(server: Server) -> None:
    img = png_bytes(4)
    files = {"image": ("q.png", img, "image/png")}
    r = server.client.post("/v1/search", params={"k": 2}, files=files)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = server.client.post("/v1/search", files=files)  # neither: the default 10 (capped by the index size)
    assert r.status_code == 200 and len(r.json()["results"]) == 10
    r = server.client.post("/v1/search", params={"k": 2}, files=files, data={"k": "2"})  # both, equal
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = server.client.post("/v1/search", params={"k": 2}, files=files, data={"k": "3"})
    assert r.status_code == 422 and "twice" in r.json()["detail"]
    for bad in (0, 51):
        r = server.client.post("/v1/search", params={"k": bad}, files=files)
        assert r.status_code == 422 and "1..50" in r.json()["detail"]
    vec = [1.0] * server.client.get("/v1/stats").json()["dim"]
    r = server.client.post("/v1/search/vector", params={"k": 3}, json={"vector": vec})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def _slow_send(port: int, data: bytes, pause: float, give_up: float) -> tuple[bytes, int, float]:
    """Send ``data`` one byte per ``pause`` s; returns (what the server answered, bytes sent, seconds)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=give_up) as sock:
        sent = 0
        try:
            for byte in data:
                sock.sendall(bytes([byte]))
                sent += 1
                ready, _, _ = select.select([sock], [], [], pause)
                if ready:
                    break
            answer = sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
    return answer, sent, time.monotonic() - start


def test_slow_clients_are_cut_off(server: Server) -> None:
    """One header byte a second: 408 and closed after --header-timeout (2 s here); a body sent as slowly:
    408 after --body-timeout (3 s). uvicorn's own keep-alive timeout does not cover either."""
    request = (f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris-{'x' * 40}\r\n\r\n").encode()
    answer, sent, took = _slow_send(server.port, request, pause=1.0, give_up=30)
    assert answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in answer, answer
    assert sent < len(request) and HEADER_TIMEOUT - 0.5 <= took < HEADER_TIMEOUT + 5
    head = (f"POST /v1/search/vector HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n").encode()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)  # headers at full speed, then the body one byte a second
        for byte in b'{"vector": [' + b"1, " * 100:
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 1.0)[0]:
                break
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, answer
    assert time.monotonic() - start < BODY_TIMEOUT + 5
    assert server.client.get("/healthz").status_code == 200  # a normal client is unaffected


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
    assert sorted(p.name for p in index_dir.glob("snapshot-*.faiss")) == snapshots  # FAISS: nothing snapshotted
    server.start()
    for i in range(5):
        hit = _search(server.client, png_bytes(500 + i), k=1).json()["results"][0]
        assert hit["id"] == f"k{i}" and hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert server.client.get("/v1/references/ref00").status_code == 404
    assert server.client.get("/v1/stats").json()["references"] == before + 5 - 1
