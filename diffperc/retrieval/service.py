"""HTTP service for origin identification: search an index of origins with a translated image.

Serves a reference index (:class:`~diffperc.retrieval.index.OriginIndex`, FAISS, or
:class:`~diffperc.retrieval.milvus.MilvusIndex`) built for ID² (Wang et al., "Origin
Identification for Text-Guided Image-to-Image Diffusion Models", ICML 2025) with FastAPI:

    GET    /healthz                  liveness (never needs the token)
    GET    /v1/stats                 index size, settings, embedder
    POST   /v1/search                multipart image, k (form or ?k=) -> {"results": [{"id", "score", "uri"}], "took_ms"}
    POST   /v1/search/vector         JSON {"vector": [...], "k"}: the same for an embedding made elsewhere
    POST   /v1/references            multipart image, optional id, uri -> 201 once durable
    GET    /v1/references/{id}       metadata of one reference
    DELETE /v1/references/{id}       remove a reference
    GET    /docs                     OpenAPI page

With a token every route but ``/healthz`` needs ``Authorization: Bearer <token>`` (compared
in constant time). Bodies over the size limit get 413 before they are parsed; images that
are not images, are truncated or are decompression bombs get 400; ``k`` out of range 422;
ids with "/" or longer than 256 characters 422; a full disk 507; headers slower than
``header_timeout`` or bodies slower than ``body_timeout`` 408; at most ``max_decodes`` images are
decoded at once (others wait, then get 503). A reference is committed (FAISS: to SQLite,
write-ahead; Milvus: acknowledged by Milvus) before 201 is sent, so it survives SIGKILL.
"""

import hashlib
import ipaddress
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from ._http import Guard, h11_protocol_with_deadline
from .base import DuplicateIdError, ReferenceIndex, StorageFullError, check_ref_id, open_index, unit_rows
from .embedder import DEFAULT_MAX_PIXELS, ImageDecodeError, OriginEmbedder, read_image

__all__ = ["create_app", "is_loopback", "resolve_token", "serve"]

_log = logging.getLogger(__name__)


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
        lines = path.read_text().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"--token-file {str(path)!r} is empty: write the token on its first line")
        return token
    return os.environ.get("DIFFPERC_TOKEN", "").strip() or None


# ---------------------------------------------------------------------------- app
def _results(hits: list, start: float) -> dict[str, Any]:
    return {"results": [{"id": h.id, "score": h.score, "uri": h.uri} for h in hits],
            "took_ms": round((time.perf_counter() - start) * 1000, 3)}


def create_app(index: ReferenceIndex | str | os.PathLike, embedder: OriginEmbedder | None = None,
               token: str | None = None, max_upload_mb: float = 20.0, max_k: int = 100,
               max_pixels: int = DEFAULT_MAX_PIXELS, body_timeout: float = 60.0, max_decodes: int = 4,
               decode_wait: float = 30.0) -> Any:
    """The FastAPI application serving ``index``.

    Args:
        index: an open index (FAISS or Milvus backend) or its folder (opened here, closed at shutdown).
        embedder: the index's embedder; default: rebuilt from the folder's ``embedder.json``.
        token: bearer token; None serves without authentication (loopback only, see :func:`serve`).
        max_upload_mb: largest request body in MiB; larger ones get 413.
        max_k: largest ``k`` of a search (larger gets 422).
        max_pixels: images with more pixels get 400 (decompression bomb guard).
        body_timeout: seconds a client has to send a request body once its headers are in (408 after).
        max_decodes: images decoded and embedded at once. A decoded image takes up to ~6 bytes per
            pixel (RGB plus its copy), 384 MB at the 64 MP limit, so this caps that memory.
        decode_wait: seconds a request waits for a decode slot before it gets 503.
    """
    fastapi = _import_fastapi()
    from fastapi import File, Form, HTTPException, Query, UploadFile
    from pydantic import BaseModel, Field

    class VectorQuery(BaseModel):
        vector: list[float] = Field(description="an embedding from this index's embedder (normalised here)")
        k: int = Field(10, ge=1, description="number of results")

    if isinstance(index, (str, os.PathLike)):
        index = open_index(index)
    embedder = embedder or OriginEmbedder.from_config(index.folder)
    if embedder.dim != index.settings["dim"]:
        raise ValueError(f"embedder dimension {embedder.dim} != index dimension {index.settings['dim']}")
    if max_decodes < 1:
        raise ValueError(f"max_decodes must be >= 1, got {max_decodes}")
    decodes = threading.BoundedSemaphore(max_decodes)

    @asynccontextmanager
    async def lifespan(app: Any):
        yield
        index.close()

    app = fastapi.FastAPI(title="diffperc origin identification", version="1",
                          description="ID² retrieval: find the origin of a text-guided image-to-image translation.",
                          lifespan=lifespan)
    app.state.index, app.state.embedder = index, embedder

    def embed(data: bytes) -> Any:
        if not decodes.acquire(timeout=decode_wait):
            raise HTTPException(status_code=503, detail=f"{max_decodes} images are being decoded (--max-decodes) "
                                f"and none finished within {decode_wait:g} s: retry later", headers={"Retry-After": "5"})
        try:
            image = read_image(data, max_pixels=max_pixels)
            return embedder.embed_pil([image])
        except ImageDecodeError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err
        finally:
            decodes.release()

    def pick_k(form_k: int | None, query_k: int | None) -> int:
        if form_k is not None and query_k is not None and form_k != query_k:
            raise HTTPException(status_code=422, detail=f"k given twice with different values (form {form_k}, "
                                                        f"query {query_k}): send one")
        k = form_k if form_k is not None else query_k if query_k is not None else 10
        if not 1 <= k <= max_k:
            raise HTTPException(status_code=422, detail=f"k must be in 1..{max_k} (--max-k), got {k}")
        return k

    def disk_full(err: StorageFullError) -> HTTPException:
        _log.error("write refused: %s", err)
        return HTTPException(status_code=507, detail=f"insufficient storage: {err}. Searches still work; retry the "
                                                     "write once space is freed")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/stats")
    def stats() -> dict[str, Any]:
        return {**index.stats(), "embedder": embedder.config}

    @app.post("/v1/search")
    def search(image: Annotated[UploadFile, File(description="the query image (JPEG, PNG, WebP, ...)")],
               k: Annotated[int | None, Form(description="number of results (default 10)")] = None,
               k_query: Annotated[int | None, Query(alias="k", description="the same as the form field")] = None,
               ) -> dict[str, Any]:
        start = time.perf_counter()
        n = pick_k(k, k_query)
        return _results(index.search(embed(image.file.read()), n)[0], start)

    @app.post("/v1/search/vector")
    def search_vector(body: VectorQuery,
                      k_query: Annotated[int | None, Query(alias="k", description="overrides nothing: must "
                                                                      "equal the body's k if both are sent")] = None,
                      ) -> dict[str, Any]:
        """Search with an embedding made elsewhere; it is normalised here in float64 (any positive scale works)."""
        start = time.perf_counter()
        n = pick_k(body.k if "k" in body.model_fields_set else None, k_query)
        try:
            vector = unit_rows(body.vector, index.settings["dim"])
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        return _results(index.search(vector, n)[0], start)

    @app.post("/v1/references", status_code=201)
    def add_reference(
        image: Annotated[UploadFile, File(description="the reference (origin) image")],
        id: Annotated[str | None, Form(description="reference id (default: the file name without extension); "
                                       "1-256 characters, no '/'")] = None,
        uri: Annotated[str | None, Form(max_length=4096, description="where the origin lives")] = None,
    ) -> dict[str, Any]:
        try:
            ref_id = check_ref_id(id, "id") if id is not None else None
            if ref_id is None and image.filename:
                ref_id = check_ref_id(Path(image.filename).stem, "id from the file name")
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        data = image.file.read()
        sha = hashlib.sha256(data).hexdigest()
        ref_id = ref_id or sha[:16]
        if index.get(ref_id) is not None:
            raise HTTPException(status_code=409, detail=f"reference {ref_id!r} already exists: delete it first")
        vector = embed(data)
        try:
            index.add(vector, [ref_id], [uri or f"upload:{image.filename or ref_id}"], [sha])
        except DuplicateIdError as err:
            raise HTTPException(status_code=409, detail=f"reference {ref_id!r} already exists") from err
        except StorageFullError as err:
            raise disk_full(err) from err
        return index.get(ref_id)

    @app.get("/v1/references/{ref_id}")
    def get_reference(ref_id: str) -> dict[str, Any]:
        meta = index.get(ref_id)
        if meta is None:
            raise HTTPException(status_code=404, detail=f"no reference {ref_id!r}")
        return meta

    @app.delete("/v1/references/{ref_id}")
    def delete_reference(ref_id: str) -> dict[str, str]:
        try:
            removed = index.remove(ref_id)
        except StorageFullError as err:
            raise disk_full(err) from err
        if not removed:
            raise HTTPException(status_code=404, detail=f"no reference {ref_id!r}")
        return {"deleted": ref_id}

    app.add_middleware(Guard, token=token, max_bytes=int(max_upload_mb * 2**20), body_timeout=body_timeout)
    return app


def serve(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          token_file: str | os.PathLike | None = None, max_upload_mb: float = 20.0, max_k: int = 100,
          log_level: str = "info", embedder: OriginEmbedder | None = None, backend: str | None = None,
          uri: str | None = None, header_timeout: float = 10.0, body_timeout: float = 60.0,
          max_decodes: int = 4) -> None:
    """Run the service with uvicorn until interrupted (a clean stop writes a snapshot).

    ``embedder``: the index's embedder, placed on its device (default: rebuilt from ``embedder.json``).

    Refuses to bind a non-loopback address without a token (``token_file`` or ``$DIFFPERC_TOKEN``).

    Args:
        backend, uri: see :func:`~diffperc.retrieval.base.open_index` (the Milvus token comes
            from ``$MILVUS_TOKEN``).
        header_timeout: seconds a client has to send its request headers (408 and closed after).
        body_timeout, max_decodes: see :func:`create_app`.
    """
    import uvicorn

    token = resolve_token(token_file)
    if token is None and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without a token: anyone who can reach it could add and "
                         "delete references. Pass --token-file FILE or set DIFFPERC_TOKEN, or use --host 127.0.0.1")
    index = open_index(index_dir, backend=backend, uri=uri, token=os.environ.get("MILVUS_TOKEN") or None)
    app = create_app(index, embedder=embedder, token=token, max_upload_mb=max_upload_mb, max_k=max_k,
                     body_timeout=body_timeout, max_decodes=max_decodes)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                http=h11_protocol_with_deadline(header_timeout))
