"""HTTP service for origin identification: search an index of origins with a translated image.

Serves an :class:`~diffperc.retrieval.index.OriginIndex` built for ID² (Wang et al., "Origin
Identification for Text-Guided Image-to-Image Diffusion Models", ICML 2025) with FastAPI:

    GET    /healthz                  liveness (never needs the token)
    GET    /v1/stats                 index size, settings, embedder
    POST   /v1/search                multipart image, k -> {"results": [{"id", "score", "uri"}], "took_ms"}
    POST   /v1/search/vector         JSON {"vector": [...], "k"}: the same, for a router over shards
    POST   /v1/references            multipart image, optional id, uri -> 201 once durable
    GET    /v1/references/{id}       metadata of one reference
    DELETE /v1/references/{id}       remove a reference
    GET    /docs                     OpenAPI page

With a token every route but ``/healthz`` needs ``Authorization: Bearer <token>`` (compared
in constant time). Bodies over the size limit get 413 before they are parsed; images that
are not images, are truncated or are decompression bombs get 400; ``k`` out of range 422.
A reference is committed to SQLite (write-ahead) before 201 is sent, so it survives SIGKILL.
"""

import hashlib
import hmac
import ipaddress
import json
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from .embedder import DEFAULT_MAX_PIXELS, ImageDecodeError, OriginEmbedder, read_image
from .index import DuplicateIdError, OriginIndex

__all__ = ["create_app", "is_loopback", "resolve_token", "serve"]

_DRAIN_CAP = 256 * 2**20  # read (and drop) at most this much of a refused body so the client sees the answer


def _import_fastapi() -> Any:
    try:
        import fastapi
    except ImportError as err:
        raise ImportError("the HTTP service needs FastAPI and uvicorn: pip install 'diffperc[retrieval]' "
                          "(or pip install fastapi uvicorn python-multipart)") from err
    return fastapi


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$DIFFPERC_TOKEN``, else None."""
    if token_file is not None:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--token-file {str(path)!r} does not exist")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"--token-file {str(path)!r} is empty: write the token on its first line")
        return token
    return os.environ.get("DIFFPERC_TOKEN", "").strip() or None


# ---------------------------------------------------------------------------- ASGI guard
async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
           (b"connection", b"close")] + [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def _drain(receive: Any, cap: int) -> None:
    """Read and drop the rest of a request body (up to ``cap`` bytes) before answering early."""
    seen = 0
    while seen <= cap:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


class _Guard:
    """Pure ASGI middleware: bearer-token check, then the body-size limit (the body is buffered to check it)."""

    def __init__(self, app: Any, token: str | None, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.token = f"Bearer {token}".encode() if token else None

    def _authorized(self, scope: dict[str, Any]) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.token is not None and scope["path"] != "/healthz" and not self._authorized(scope):
            await _drain(receive, self.max_bytes)
            return await _send_json(send, 401, {"detail": "missing or wrong token: send the header "
                                                "'Authorization: Bearer <token>'"}, {"www-authenticate": "Bearer"})
        too_big = {"detail": f"request body larger than the limit of {self.max_bytes / 2**20:g} MB "
                             "(--max-upload-mb)"}
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= _DRAIN_CAP:
                await _drain(receive, _DRAIN_CAP)
            return await _send_json(send, 413, too_big)
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # client went away
            body += msg.get("body", b"")
            if len(body) > self.max_bytes:
                if msg.get("more_body", False):
                    await _drain(receive, _DRAIN_CAP)
                return await _send_json(send, 413, too_big)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------- app
def create_app(index: OriginIndex | str | os.PathLike, embedder: OriginEmbedder | None = None,
               token: str | None = None, max_upload_mb: float = 20.0, max_k: int = 100,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """The FastAPI application serving ``index``.

    Args:
        index: an open :class:`OriginIndex` or its folder (opened here, closed at shutdown).
        embedder: the index's embedder; default: rebuilt from the folder's ``embedder.json``.
        token: bearer token; None serves without authentication (loopback only, see :func:`serve`).
        max_upload_mb: largest request body in MiB; larger ones get 413.
        max_k: largest ``k`` of a search (larger gets 422).
        max_pixels: images with more pixels get 400 (decompression bomb guard).
    """
    fastapi = _import_fastapi()
    from fastapi import File, Form, HTTPException, UploadFile
    from pydantic import BaseModel, Field

    class VectorQuery(BaseModel):
        vector: list[float] = Field(description="an embedding from this index's embedder (normalised here)")
        k: int = Field(10, ge=1, description="number of results")

    if not isinstance(index, OriginIndex):
        index = OriginIndex.open(index)
    embedder = embedder or OriginEmbedder.from_config(index.folder)
    if embedder.dim != index.settings["dim"]:
        raise ValueError(f"embedder dimension {embedder.dim} != index dimension {index.settings['dim']}")

    @asynccontextmanager
    async def lifespan(app: Any):
        yield
        index.close()

    app = fastapi.FastAPI(title="diffperc origin identification", version="1",
                          description="ID² retrieval: find the origin of a text-guided image-to-image translation.",
                          lifespan=lifespan)
    app.state.index, app.state.embedder = index, embedder

    def embed(data: bytes) -> Any:
        try:
            image = read_image(data, max_pixels=max_pixels)
        except ImageDecodeError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err
        return embedder.embed_pil([image])

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/stats")
    def stats() -> dict[str, Any]:
        return {**index.stats(), "embedder": embedder.config}

    @app.post("/v1/search")
    def search(image: Annotated[UploadFile, File(description="the query image (JPEG, PNG, WebP, ...)")],
               k: Annotated[int, Form(ge=1, le=max_k, description="number of results")] = 10) -> dict[str, Any]:
        start = time.perf_counter()
        hits = index.search(embed(image.file.read()), k)[0]
        return {"results": [{"id": h.id, "score": h.score, "uri": h.uri} for h in hits],
                "took_ms": round((time.perf_counter() - start) * 1000, 3)}

    @app.post("/v1/search/vector")
    def search_vector(body: VectorQuery) -> dict[str, Any]:
        """Search with an embedding made elsewhere (a router that embeds once and fans out to shards)."""
        import numpy as np

        start = time.perf_counter()
        if body.k > max_k:
            raise HTTPException(status_code=422, detail=f"k must be <= {max_k}")
        vector = np.asarray(body.vector, dtype=np.float32)[None]
        if vector.shape[1] != index.settings["dim"] or not np.isfinite(vector).all() or not vector.any():
            raise HTTPException(status_code=422, detail=f"vector must be {index.settings['dim']} finite numbers, "
                                                        "not all zero")
        hits = index.search(vector / np.linalg.norm(vector), body.k)[0]
        return {"results": [{"id": h.id, "score": h.score, "uri": h.uri} for h in hits],
                "took_ms": round((time.perf_counter() - start) * 1000, 3)}

    @app.post("/v1/references", status_code=201)
    def add_reference(
        image: Annotated[UploadFile, File(description="the reference (origin) image")],
        id: Annotated[str | None, Form(min_length=1, max_length=256,
                                       description="reference id (default: the file name without extension)")] = None,
        uri: Annotated[str | None, Form(max_length=4096, description="where the origin lives")] = None,
    ) -> dict[str, Any]:
        data = image.file.read()
        sha = hashlib.sha256(data).hexdigest()
        ref_id = id or Path(image.filename or "").stem or sha[:16]
        if index.get(ref_id) is not None:
            raise HTTPException(status_code=409, detail=f"reference {ref_id!r} already exists: delete it first")
        vector = embed(data)
        try:
            index.add(vector, [ref_id], [uri or f"upload:{image.filename or ref_id}"], [sha])
        except DuplicateIdError as err:
            raise HTTPException(status_code=409, detail=f"reference {ref_id!r} already exists") from err
        return index.get(ref_id)

    @app.get("/v1/references/{ref_id}")
    def get_reference(ref_id: str) -> dict[str, Any]:
        meta = index.get(ref_id)
        if meta is None:
            raise HTTPException(status_code=404, detail=f"no reference {ref_id!r}")
        return meta

    @app.delete("/v1/references/{ref_id}")
    def delete_reference(ref_id: str) -> dict[str, str]:
        if not index.remove(ref_id):
            raise HTTPException(status_code=404, detail=f"no reference {ref_id!r}")
        return {"deleted": ref_id}

    app.add_middleware(_Guard, token=token, max_bytes=int(max_upload_mb * 2**20))
    return app


def serve(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          token_file: str | os.PathLike | None = None, max_upload_mb: float = 20.0, max_k: int = 100,
          log_level: str = "info", embedder: OriginEmbedder | None = None) -> None:
    """Run the service with uvicorn until interrupted (a clean stop writes a snapshot).

    ``embedder``: the index's embedder, placed on its device (default: rebuilt from ``embedder.json``).

    Refuses to bind a non-loopback address without a token (``token_file`` or ``$DIFFPERC_TOKEN``).
    """
    import uvicorn

    token = resolve_token(token_file)
    if token is None and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without a token: anyone who can reach it could add and "
                         "delete references. Pass --token-file FILE or set DIFFPERC_TOKEN, or use --host 127.0.0.1")
    app = create_app(index_dir, embedder=embedder, token=token, max_upload_mb=max_upload_mb, max_k=max_k)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
