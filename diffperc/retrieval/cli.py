"""``diffperc index build|add|query|stats`` and ``diffperc serve``: origin identification from the shell.

Retrieval for ID² (Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion
Models", ICML 2025): reference (origin) images are embedded with a VAE (+ learned projection)
into a FAISS index; a translated image is searched against it.

    diffperc index build --images DIR --out INDEX_DIR [--model NAME|PATH] [--projection FILE] [--factory STR]
                         [--backend milvus --uri refs.db|http://host:19530 [--milvus-index IVF_FLAT]]
    diffperc index add   --index INDEX_DIR --images DIR
    diffperc index query --index INDEX_DIR IMAGE [-k N]
    diffperc index stats --index INDEX_DIR
    diffperc serve --index INDEX_DIR [--host 127.0.0.1] [--port 8000] [--token-file FILE] [--max-upload-mb 20]
                   [--backend faiss|milvus] [--uri URI] [--header-timeout 10] [--body-timeout 60] [--max-decodes 4]

``add_parser(subparsers)`` adds the ``index`` and ``serve`` subcommands to ``diffperc``'s
parser and ``run(args)`` runs them; ``python -m diffperc.retrieval.cli ...`` works alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .._io import IMAGE_SUFFIXES, atomic_dir, list_images
from ..cli._options import add_device_options

__all__ = ["IMAGE_SUFFIXES", "add_images", "add_parser", "build_index", "index_stats", "main", "query_index", "run"]

COMMANDS = ("index", "serve")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``index`` (with build/add/query/stats) and ``serve`` to a ``diffperc`` subparsers object."""
    index = subparsers.add_parser("index", help="build, grow, query and describe an origin-identification index",
                                  description="A FAISS index of reference (origin) images embedded by a VAE "
                                  "(+ learned ID² projection), with metadata in SQLite. Reference ids are file "
                                  "names without their extension.")
    sub = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="embed a folder of references into a new index")
    build.add_argument("--images", required=True, help="folder of reference images (ids = file stems)")
    build.add_argument("--out", required=True, help="new index folder (written atomically)")
    build.add_argument("--model", default="digits", help="preset (digits, sd21, ...), diffusers folder or hub id "
                       "whose VAE embeds (default: digits; ID² uses sd21 at 256 px)")
    build.add_argument("--projection", default=None, help="learned W (.safetensors or torch file); default: raw VAE")
    build.add_argument("--factory", default="Flat", help="FAISS index_factory string: Flat (default, exact), "
                       "HNSW32, IVF4096,PQ64, ... (trained on a sample of the references)")
    build.add_argument("--image-size", type=int, default=None, help="resize side (default: min(256, VAE sample size))")
    build.add_argument("--backend", default="faiss", choices=("faiss", "milvus"), help="where the vectors live: "
                       "faiss (default, in the folder) or milvus (a Milvus collection at --uri)")
    build.add_argument("--uri", default=None, help="milvus: a Milvus Lite file (refs.db) or a server "
                       "(http://host:19530; token from $MILVUS_TOKEN)")
    build.add_argument("--collection", default="origins", help="milvus: collection name (default: origins)")
    build.add_argument("--milvus-index", default="AUTOINDEX", help="milvus: index type (AUTOINDEX, FLAT, "
                       "IVF_FLAT, HNSW, ...; Milvus Lite builds FLAT, IVF_FLAT or AUTOINDEX)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add = sub.add_parser("add", help="embed more references into an existing index")
    add.add_argument("--index", required=True, help="index folder")
    add.add_argument("--images", required=True, help="folder of reference images (ids = file stems)")
    query = sub.add_parser("query", help="find the origins of one image")
    query.add_argument("--index", required=True, help="index folder")
    query.add_argument("image", help="query image")
    query.add_argument("-k", type=int, default=5, help="number of results (default: 5)")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats = sub.add_parser("stats", help="print the index size, settings and embedder")
    stats.add_argument("--index", required=True, help="index folder")
    for p in (build, add):
        p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (default: 32)")
        p.add_argument("--strict", action="store_true", help="stop at the first unreadable image (default: skip "
                       "and count)")
    for p in (build, add, query):
        add_device_options(p)

    serve = subparsers.add_parser("serve", help="serve an index over HTTP (FastAPI; OpenAPI page at /docs)",
                                  description="Search and grow an index over HTTP. Every route but /healthz needs "
                                  "'Authorization: Bearer <token>' when a token is set (--token-file or "
                                  "DIFFPERC_TOKEN); a non-loopback --host requires one.")
    serve.add_argument("--index", required=True, help="index folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--token-file", default=None, help="file whose first line is the bearer token")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default: 20)")
    serve.add_argument("--max-k", type=int, default=100, help="largest k of a search (default: 100)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_device_options(serve)
    serve.add_argument("--backend", default=None, choices=("faiss", "milvus"), help="check the index folder is of "
                       "this backend (default: whichever it is)")
    serve.add_argument("--uri", default=None, help="milvus: reach the collection at this URI instead of the one "
                       "recorded at build time (token from $MILVUS_TOKEN)")
    serve.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send its request "
                       "headers; slower gets 408 and is disconnected (default: 10)")
    serve.add_argument("--body-timeout", type=float, default=60.0, help="seconds a client has to send a request body "
                       "after its headers (default: 60)")
    serve.add_argument("--max-decodes", type=int, default=4, help="images decoded at once; others wait (default: 4)")


# ---------------------------------------------------------------------------- work
def place_embedder(embedder, device=None, torch_dtype=None):
    """Move an OriginEmbedder to ``device`` / ``torch_dtype`` (default: cuda when available, float32).

    The fingerprint is taken first, from the weights as loaded, so an index built in bf16 on a GPU
    opens in fp32 on a CPU (and the other way round).
    """
    from ..devices import resolve_device, resolve_dtype

    embedder.fingerprint()
    return embedder.to(device=resolve_device(device), dtype=resolve_dtype(torch_dtype))


def _list_images(folder: Path) -> list[Path]:
    images, _ = list_images(folder, "--images", "their references (the id)")
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return images


def _embed_folder(index, embedder, images: list[Path], batch_size: int, strict: bool, err: TextIO) -> dict[str, int]:
    """Embed and add images in batches (durable per batch); skips ids already present and unreadable files."""
    from tqdm.auto import tqdm

    from .base import check_ref_id
    from .embedder import ImageDecodeError, read_image

    counts = {"added": 0, "skipped_existing": 0, "skipped_unreadable": 0, "skipped_bad_id": 0}
    bar = tqdm(total=len(images), desc="embed", unit="img", file=err)
    for start in range(0, len(images), batch_size):
        pils, ids, uris, shas = [], [], [], []
        for path in images[start : start + batch_size]:
            try:
                check_ref_id(path.stem, "id from the file name")
            except ValueError as e:
                if strict:
                    raise ValueError(f"{path}: {e}") from e
                counts["skipped_bad_id"] += 1
                tqdm.write(f"skipped {path.name[:60]}: {e}", file=err)
                continue
            if index.get(path.stem) is not None:
                counts["skipped_existing"] += 1
                continue
            data = path.read_bytes()
            try:
                pils.append(read_image(data))
            except ImageDecodeError as e:
                if strict:
                    raise ImageDecodeError(f"{path}: {e}") from e
                counts["skipped_unreadable"] += 1
                tqdm.write(f"skipped {path.name}: {e}", file=err)
                continue
            ids.append(path.stem)
            uris.append(str(path.resolve()))
            shas.append(hashlib.sha256(data).hexdigest())
        if pils:
            index.add(embedder.embed_pil(pils, batch_size), ids, uris, shas)
            counts["added"] += len(pils)
        bar.update(len(images[start : start + batch_size]))
    bar.close()
    return counts


def build_index(images_dir: str | Path, out: str | Path, model: str = "digits", projection: str | None = None,
                factory: str = "Flat", image_size: int | None = None, batch_size: int = 32, strict: bool = False,
                overwrite: bool = False, err: TextIO | None = None, backend: str = "faiss", uri: str | None = None,
                collection: str = "origins", milvus_index: str = "AUTOINDEX", device=None,
                torch_dtype=None) -> dict[str, int]:
    """Embed every image of ``images_dir`` into a new index at ``out`` (built in a temp folder, then renamed).

    Trained factories (IVF, PQ) are trained on a sample of all the references, so they are
    embedded first and added together; ``Flat`` and ``HNSW`` add batch by batch. With
    ``backend="milvus"`` the vectors go to ``collection`` at ``uri`` (``out`` keeps the embedder
    and ``milvus.json``); ``overwrite`` then also drops an existing collection of that name.
    """
    from .embedder import OriginEmbedder
    from .index import OriginIndex

    err = err or sys.stderr
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists: pick a new folder, use `diffperc index add`, or --overwrite")
    if backend not in ("faiss", "milvus"):
        raise ValueError(f"--backend must be faiss or milvus, got {backend!r}")
    if (backend == "milvus") != (uri is not None):
        raise ValueError("--backend milvus needs --uri (a Milvus Lite file such as refs.db, or http://host:19530); "
                         "--uri is only for --backend milvus")
    images = _list_images(Path(images_dir))
    embedder = place_embedder(OriginEmbedder.from_model(model, projection, image_size=image_size), device, torch_dtype)
    with atomic_dir(out) as tmp:
        embedder.save_config(tmp)
        if backend == "milvus":
            from .milvus import MilvusIndex

            index = MilvusIndex.create(tmp, embedder.dim, uri=uri, collection=collection, index_type=milvus_index,
                                       overwrite=overwrite, token=os.environ.get("MILVUS_TOKEN") or None)
            try:
                counts = _embed_folder(index, embedder, images, batch_size, strict, err)
            except BaseException:  # the folder is removed: drop its half-filled collection too
                index.client.drop_collection(index.collection)
                index.close(snapshot=False)
                raise
            index.close()
            return counts
        index = OriginIndex.create(tmp, embedder.dim, factory=factory)
        if index.index.is_trained:
            counts = _embed_folder(index, embedder, images, batch_size, strict, err)
        else:
            counts = _build_trained(index, embedder, images, batch_size, strict, err)
        index.close()
    return counts


def _build_trained(index, embedder, images: list[Path], batch_size: int, strict: bool, err: TextIO) -> dict[str, int]:
    """Embed everything into a Flat staging index, then train the real one on all vectors and add them."""
    import numpy as np

    from .index import OriginIndex

    with tempfile.TemporaryDirectory(dir=index.folder.parent) as stage_dir:
        stage = OriginIndex.create(Path(stage_dir) / "stage", embedder.dim, factory="Flat")
        counts = _embed_folder(stage, embedder, images, batch_size, strict, err)
        with stage._db_lock:
            rows = stage._db.execute("SELECT r.ref_id, r.uri, r.sha256, v.vec FROM refs r JOIN vectors v "
                                     "ON r.fid = v.fid ORDER BY r.fid").fetchall()
        stage.close(snapshot=False)
    if rows:
        vecs = np.stack([np.frombuffer(r[3], dtype=np.float32) for r in rows])
        index.add(vecs, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    return counts


def add_images(index_dir: str | Path, images_dir: str | Path, batch_size: int = 32, strict: bool = False,
               err: TextIO | None = None, device=None, torch_dtype=None) -> dict[str, int]:
    """Embed the images of ``images_dir`` not yet in the index (by id) with the index's own embedder."""
    from .base import open_index
    from .embedder import OriginEmbedder

    images = _list_images(Path(images_dir))
    index = open_index(index_dir)
    try:
        embedder = place_embedder(OriginEmbedder.from_config(index_dir), device, torch_dtype)
        return _embed_folder(index, embedder, images, batch_size, strict, err or sys.stderr)
    finally:
        index.close()


def query_index(index_dir: str | Path, image: str | Path, k: int = 5, device=None,
                torch_dtype=None) -> list[dict[str, object]]:
    """The ``k`` best references for one image file: [{"id", "score", "uri"}], best first."""
    from .base import open_index
    from .embedder import OriginEmbedder, read_image

    if k < 1:
        raise ValueError(f"-k must be >= 1, got {k}")
    index = open_index(index_dir)
    try:
        embedder = place_embedder(OriginEmbedder.from_config(index_dir), device, torch_dtype)
        vector = embedder.embed_pil([read_image(Path(image))])
        return [{"id": h.id, "score": h.score, "uri": h.uri} for h in index.search(vector, k)[0]]
    finally:
        index.close(snapshot=False)


def index_stats(index_dir: str | Path) -> dict[str, object]:
    """Index size and settings, and the embedder's config (``embedder.json``)."""
    from .base import open_index

    index = open_index(index_dir)
    try:
        return {**index.stats(), "embedder": json.loads((Path(index_dir) / "embedder.json").read_text())}
    finally:
        index.close(snapshot=False)


# ---------------------------------------------------------------------------- dispatch
def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run a parsed ``index ...`` or ``serve`` command; returns the exit code (errors print one line)."""
    from .embedder import ImageDecodeError

    out, err = out or sys.stdout, err or sys.stderr
    name = "serve" if args.command == "serve" else f"index {args.index_command}"
    try:
        if args.command == "serve":
            from .embedder import OriginEmbedder
            from .service import serve

            embedder = place_embedder(OriginEmbedder.from_config(args.index), args.device, args.dtype)
            serve(args.index, host=args.host, port=args.port, token_file=args.token_file,
                  max_upload_mb=args.max_upload_mb, max_k=args.max_k, log_level=args.log_level, embedder=embedder,
                  backend=args.backend, uri=args.uri, header_timeout=args.header_timeout,
                  body_timeout=args.body_timeout, max_decodes=args.max_decodes)
            return 0
        if args.index_command == "build":
            counts = build_index(args.images, args.out, model=args.model, projection=args.projection,
                                 factory=args.factory, image_size=args.image_size, batch_size=args.batch_size,
                                 strict=args.strict, overwrite=args.overwrite, err=err, backend=args.backend,
                                 uri=args.uri, collection=args.collection, milvus_index=args.milvus_index,
                                 device=args.device, torch_dtype=args.dtype)
            print(f"built {args.out}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()), file=out)
            return 0 if counts["added"] else 1
        if args.index_command == "add":
            counts = add_images(args.index, args.images, batch_size=args.batch_size, strict=args.strict, err=err,
                                device=args.device, torch_dtype=args.dtype)
            print(f"{args.index}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()), file=out)
            return 0
        if args.index_command == "query":
            hits = query_index(args.index, args.image, k=args.k, device=args.device, torch_dtype=args.dtype)
            if args.json:
                print(json.dumps(hits, indent=2), file=out)
            else:
                print(f"{'rank':>4}  {'score':>7}  {'id':<24} uri", file=out)
                for rank, h in enumerate(hits, 1):
                    print(f"{rank:>4}  {h['score']:7.4f}  {h['id']:<24} {h['uri']}", file=out)
            return 0
        print(json.dumps(index_stats(args.index), indent=2), file=out)
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImageDecodeError, ImportError) as e:
        print(f"diffperc {name}: error: {e}", file=err)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m diffperc.retrieval.cli index ...|serve ...``."""
    parser = argparse.ArgumentParser(prog="diffperc", description="origin identification (ID²) index and service")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser(sub)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
