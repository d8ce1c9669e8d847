"""Origin-identification retrieval speed: FAISS index types, and the HTTP service under load.

For ID² (Wang et al., "Origin Identification for Text-Guided Image-to-Image Diffusion Models",
ICML 2025), where a translated query is searched among up to millions of origins.

Part 1, indexes (baseline: exact ``Flat``, measured in the same run): N database vectors of
512-d and Q queries, build time (train + add), latency per query at batch 1 (p50/p99 over
sequential queries) and at batch 64 (p50/p99 of a batch, and per query), recall@1 against
the exact top-1. Data: isotropic random vectors are the worst case for every approximate
index and unlike embeddings, so the database is clustered (``--clusters`` centres plus
noise, unit norm) and each query is a database vector plus noise (a "translation" whose
origin is in the index), as in origin identification.

Part 2, service: ``diffperc serve`` in a subprocess on 127.0.0.1 with an index of
``--service-n`` vectors (512-d: the bundled digits VAE + a random 256 -> 512 projection), 8
concurrent clients posting PNG digits to /v1/search for ``--seconds``, then the same with one
more client adding references all the time. Searches/s, p50/p99 latency, adds/s, errors, and
whether every acknowledged add is found afterwards.

    python benchmarks/bench_retrieval.py                       # N = 200k, ~5 min on 2 cores
    python benchmarks/bench_retrieval.py --n 1000000           # the issue's size, if time allows
    python benchmarks/bench_retrieval.py --skip-service --json results.json
    python benchmarks/bench_retrieval.py --skip-indexes --skip-service --backends   # FAISS vs Milvus Lite, 100k

Part 3, backends (``--backends``): the service's two backends at ``--backend-n`` (100k), built and
searched through :class:`OriginIndex` (FAISS) and :class:`MilvusIndex` (Milvus Lite, a local
file): build time (adds of 10k; for Milvus also the flush and the index build, waited for),
p50/p99 of one query, recall@1 against the exact top-1. Milvus is searched only after the flush,
once every row is indexed and the collection reloaded, so no query scans a growing segment.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- data
def clustered(n: int, d: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """(n, d) float32 unit vectors: random centres plus isotropic noise of norm ~``spread``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(n - s, 100_000)
        noise = rng.standard_normal((m, d)).astype(np.float32) * (spread / np.sqrt(d))
        x[s : s + m] = centres[rng.integers(0, clusters, m)] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def perturbed_queries(base: np.ndarray, q: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``q`` queries = random database vectors + noise of norm ~``noise`` (renormalised); their origins."""
    rng = np.random.default_rng(seed)
    origins = rng.choice(len(base), q, replace=False)
    x = base[origins] + rng.standard_normal((q, base.shape[1])).astype(np.float32) * (noise / np.sqrt(base.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), origins


# ---------------------------------------------------------------------------- part 1
def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


def bench_index(faiss, factory: str, param_sets: list[dict], base: np.ndarray, queries: np.ndarray, train_n: int,
                n_single: int | None = None) -> list[dict]:
    """Build ``factory`` on ``base`` once; per search-parameter set, time single and batched searches.

    Returns one row per parameter set (numbers and top-1 ids; the build time is the shared build's).

    Single-query latency is timed on the first ``n_single`` queries (all by default); top-1 ids
    (for recall) come from the batched searches, which cover every query.
    """
    d = base.shape[1]
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    start = time.perf_counter()
    if not index.is_trained:
        sample = base[np.random.default_rng(1).choice(len(base), min(train_n, len(base)), replace=False)]
        index.train(sample)
    train_s = time.perf_counter() - start
    for s in range(0, len(base), 100_000):
        index.add(base[s : s + 100_000])
    build_s = time.perf_counter() - start
    rows = []
    for params in param_sets:
        rows.append(_time_searches(faiss, index, params, queries, n_single) | {
            "index": factory + (" " + ",".join(f"{k}={v}" for k, v in params.items()) if params else ""),
            "train_s": train_s, "build_s": build_s, "memory_mb": faiss.serialize_index(index).nbytes / 2**20})
    return rows


def _time_searches(faiss, index, params: dict, queries: np.ndarray, n_single: int | None) -> dict:
    """Latency at batch 1 (first ``n_single`` queries) and 64 (every query; gives the top-1 ids)."""
    ps = faiss.ParameterSpace()
    for key, value in params.items():
        ps.set_index_parameter(index, key, value)
    single = []
    for i in range(min(n_single or len(queries), len(queries))):
        t = time.perf_counter()
        index.search(queries[i : i + 1], 10)
        single.append((time.perf_counter() - t) * 1000)
    batch = []
    top1 = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), 64):
        t = time.perf_counter()
        _, ids = index.search(queries[s : s + 64], 10)
        if s + 64 <= len(queries):  # only full batches are timed
            batch.append((time.perf_counter() - t) * 1000)
        top1[s : s + 64] = ids[:, 0]
    return {"p50_1_ms": pct(single, 50), "p99_1_ms": pct(single, 99), "n_single": len(single),
            "p50_64_ms": pct(batch, 50), "p99_64_ms": pct(batch, 99), "per_query_64_ms": pct(batch, 50) / 64,
            "top1": top1}


def part1(args: argparse.Namespace) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    base = clustered(args.n, args.dim, args.clusters, args.spread, seed=0)
    queries, origins = perturbed_queries(base, args.queries, args.noise, seed=1)
    print(f"data: {args.n} x {args.dim} clustered unit vectors, {args.queries} perturbed queries "
          f"({time.perf_counter() - t:.1f} s); FAISS {faiss.__version__}, {args.threads} thread(s)", flush=True)
    nlist = args.nlist or int(2 ** round(np.log2(4 * np.sqrt(args.n))))
    pq = args.dim // 8  # 64 sub-quantizers of 8-d for 512-d
    # One build per factory; rows of the same factory (e.g. HNSW32 at several efSearch) share it.
    configs = [("Flat", [{}]), ("HNSW32", [{"efSearch": 64}, {"efSearch": 128}, {"efSearch": 256}]),
               (f"IVF{nlist},Flat", [{"nprobe": 16}]), (f"IVF{nlist},PQ{pq}", [{"nprobe": 32}]),
               (f"IVF{nlist},PQ{pq},RFlat", [{"nprobe": 32, "k_factor_rf": 16}])]
    rows = []
    for factory, param_sets in configs:
        print(f"  {factory} ...", end="", flush=True)
        n_single = args.flat_single if factory == "Flat" else None
        for row in bench_index(faiss, factory, param_sets, base, queries, train_n=max(40 * nlist, 25_600),
                               n_single=n_single):
            print(f" [{row['index']}: build {row['build_s']:.1f} s, p50 {row['p50_1_ms']:.2f} ms]", end="", flush=True)
            rows.append(row)
        print(flush=True)
    exact = rows[0]["top1"]
    for row in rows:
        row["recall@1"] = float(np.mean(row.pop("top1") == exact))
    print(f"  (exact top-1 is the query's own origin for {np.mean(exact == origins):.3f} of queries)")
    return rows


def print_part1(rows: list[dict], args: argparse.Namespace) -> None:
    base = rows[0]["p50_1_ms"]
    print(f"\nIndexes at N = {args.n:,} x {args.dim}-d, {args.threads} thread(s) (baseline: Flat)")
    print("| index | build s | p50 / p99 ms, batch 1 | p50 / p99 ms, batch 64 | ms/query at 64 | recall@1 | "
          "memory MB | p50 vs Flat |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"(batch-1 latency over the first {rows[0]['n_single']} queries for Flat, all {args.queries} for the others)")
    for r in rows:
        print(f"| {r['index']} | {r['build_s']:.1f} | {r['p50_1_ms']:.2f} / {r['p99_1_ms']:.2f} | "
              f"{r['p50_64_ms']:.1f} / {r['p99_64_ms']:.1f} | {r['per_query_64_ms']:.3f} | {r['recall@1']:.3f} | "
              f"{r['memory_mb']:.0f} | {base / r['p50_1_ms']:.1f}x faster |")


# ---------------------------------------------------------------------------- part 3: FAISS vs Milvus
def exact_top1(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The exact top-1 (inner product of unit vectors) of each query, in chunks of the database."""
    best, arg = np.full(len(queries), -np.inf, dtype=np.float32), np.zeros(len(queries), dtype=np.int64)
    for s in range(0, len(base), 50_000):
        scores = queries @ base[s : s + 50_000].T
        i = scores.argmax(1)
        better = scores[np.arange(len(queries)), i] > best
        best[better], arg[better] = scores[np.arange(len(queries)), i][better], s + i[better]
    return arg


def _seal_and_index(index) -> tuple[float, str]:
    """Milvus: flush (seal the growing segments), wait until the vector index covers every row, then
    release and load the collection, so that searches run on the built index and not on a brute-force
    scan of growing segments. FAISS: nothing to do. Returns (seconds, the index state seen)."""
    client = getattr(index, "client", None)
    if client is None:
        return 0.0, "-"
    start, coll = time.perf_counter(), index.collection
    client.flush(coll)
    name = client.list_indexes(coll)[0]
    while True:
        info = client.describe_index(coll, name)
        done = info.get("pending_index_rows", 0) == 0 and info.get("indexed_rows", 0) >= info.get("total_rows", 0)
        if done or time.perf_counter() - start > 3600:
            break
        time.sleep(1.0)
    client.release_collection(coll)
    client.load_collection(coll)
    state = f"{info.get('state')}, {info.get('indexed_rows')}/{info.get('total_rows')} rows indexed"
    return time.perf_counter() - start, state


def bench_backend(make, label: str, base: np.ndarray, queries: np.ndarray, exact: np.ndarray,
                  n_single: int) -> dict:
    """Build a reference index through the library's classes (what the service runs), then time searches.

    Build = adds of 10k (FAISS trains on the first) + for Milvus a flush and the index build
    (:func:`_seal_and_index`); searches are timed only after that, on the loaded collection.
    """
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    index = make()
    for s in range(0, len(base), 10_000):
        index.add(base[s : s + 10_000], [f"r{i}" for i in range(s, min(len(base), s + 10_000))])
        done = min(len(base), s + 10_000)
        if done % 100_000 == 0 and done < len(base):  # progress on the long 1M builds
            print(f" [{done:,} added, {time.perf_counter() - start:.0f} s]", end="", flush=True)
    add_s = time.perf_counter() - start
    index_s, state = _seal_and_index(index)
    build_s = time.perf_counter() - start
    index.search(queries[:1], 10)  # first search: Milvus loads segments, FAISS warms caches
    single, top1 = [], np.empty(len(queries), dtype=np.int64)
    for i in range(len(queries)):
        t = time.perf_counter()
        hits = index.search(queries[i : i + 1], 10)[0]
        if i < n_single:
            single.append((time.perf_counter() - t) * 1000)
        top1[i] = int(hits[0].id[1:]) if hits else -1
    if getattr(index, "client", None) is not None:  # free Milvus Lite's memory and disk for the next row
        index.client.drop_collection(index.collection)
    index.close(snapshot=False)
    return {"backend": label, "build_s": build_s, "add_s": add_s, "index_s": index_s, "index_state": state,
            "p50_1_ms": pct(single, 50), "p99_1_ms": pct(single, 99), "recall@1": float(np.mean(top1 == exact)),
            "n_single": len(single), "load_avg": (load0 + os.getloadavg()[0]) / 2}


def part3(args: argparse.Namespace) -> list[dict]:
    """The service's two backends at ``--backend-n``: FAISS (OriginIndex) and Milvus Lite (MilvusIndex)."""
    import faiss

    from diffperc.retrieval.index import OriginIndex
    from diffperc.retrieval.milvus import MilvusIndex

    faiss.omp_set_num_threads(args.threads)
    n = args.backend_n
    base = clustered(n, args.dim, args.clusters, args.spread, seed=0)
    queries, _ = perturbed_queries(base, args.queries, args.noise, seed=1)
    exact = exact_top1(base, queries)
    nlist = int(2 ** round(np.log2(4 * np.sqrt(n))))
    tmp = Path(tempfile.mkdtemp(prefix="bench_backends_"))
    makers = [
        ("FAISS Flat (baseline)", lambda: OriginIndex.create(tmp / "f_flat", args.dim, "Flat")),
        (f"FAISS IVF{nlist},Flat nprobe 16", lambda: OriginIndex.create(tmp / "f_ivf", args.dim, f"IVF{nlist},Flat",
                                                                        nprobe=16)),
        ("FAISS HNSW32 ef 128", lambda: OriginIndex.create(tmp / "f_hnsw", args.dim, "HNSW32", ef_search=128)),
        ("Milvus Lite FLAT", lambda: MilvusIndex.create(tmp / "m_flat", args.dim, str(tmp / "m.db"), "flat",
                                                        index_type="FLAT")),
        (f"Milvus Lite IVF_FLAT nlist {nlist} nprobe 16", lambda: MilvusIndex.create(
            tmp / "m_ivf", args.dim, str(tmp / "m.db"), "ivf", index_type="IVF_FLAT",
            index_params={"nlist": nlist}, nprobe=16)),
        ("Milvus Lite HNSW M 32 ef 128", lambda: MilvusIndex.create(
            tmp / "m_hnsw", args.dim, str(tmp / "m.db"), "hnsw", index_type="HNSW",
            index_params={"M": 32, "efConstruction": 200}, ef_search=128)),
        ("Milvus Lite AUTOINDEX", lambda: MilvusIndex.create(tmp / "m_auto", args.dim, str(tmp / "m.db"), "auto")),
    ]
    print(f"\nbackends: {n:,} x {args.dim}-d, {args.queries} queries", flush=True)
    rows = []
    for label, make in makers:
        if args.backend_filter and not any(f in label for f in args.backend_filter):
            continue
        print(f"  {label} ...", end="", flush=True)
        try:
            row = bench_backend(make, label, base, queries, exact, args.backend_single)
        except Exception as err:  # noqa: BLE001 - one backend failing must not lose the others' numbers
            print(f" failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
        print(f" build {row['build_s']:.1f} s ({row['add_s']:.1f} + {row['index_s']:.1f}), p50 / p99 "
              f"{row['p50_1_ms']:.2f} / {row['p99_1_ms']:.2f} ms, recall@1 {row['recall@1']:.3f}"
              f" (load avg {row['load_avg']:.1f})", flush=True)
        rows.append(row)
    shutil.rmtree(tmp, ignore_errors=True)  # GBs at 1M
    return rows


def print_part3(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nBackends at N = {args.backend_n:,} x {args.dim}-d through OriginIndex / MilvusIndex, "
          f"{args.threads} thread(s), batch-1 latency over {rows[0]['n_single']} queries, recall@1 vs exact "
          "(baseline: first row)")
    print("| backend, index | build s (adds + flush/index) | p50 / p99 ms | recall@1 | p50 vs first row | load avg |")
    print("|---|---|---|---|---|---|")
    base = rows[0]["p50_1_ms"]
    for r in rows:
        print(f"| {r['backend']} | {r['build_s']:.1f} ({r['add_s']:.1f} + {r['index_s']:.1f}) | "
              f"{r['p50_1_ms']:.2f} / {r['p99_1_ms']:.2f} | {r['recall@1']:.3f} | {base / r['p50_1_ms']:.1f}x | "
              f"{r['load_avg']:.1f} |")
    for r in rows:
        if r["index_state"] != "-":
            print(f"  {r['backend']}: index {r['index_state']}")


# ---------------------------------------------------------------------------- part 2
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digit_pngs(n: int) -> list[bytes]:
    from PIL import Image

    from diffperc.data.digits import load

    images, _ = load("heldout")
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray((images[i % len(images)].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def make_service_index(folder: Path, n: int, factory: str, seed: int = 0) -> None:
    """An index of ``n`` synthetic 512-d vectors whose embedder is the digits VAE + a random 256 -> 512 W."""
    import torch

    from diffperc.retrieval.embedder import OriginEmbedder, load_vae
    from diffperc.retrieval.index import OriginIndex

    vae = load_vae("digits")
    w = torch.randn(512, OriginEmbedder(vae, image_size=32).feature_dim, generator=torch.Generator().manual_seed(seed))
    emb = OriginEmbedder(vae, projection=w, image_size=32, model="digits")
    folder.mkdir(parents=True)
    emb.save_config(folder)
    index = OriginIndex.create(folder, emb.dim, factory=factory, ef_search=128)
    vecs = clustered(n, 512, 1000, 1.0, seed)
    for s in range(0, n, 50_000):
        index.add(vecs[s : s + 50_000], [f"syn{i}" for i in range(s, min(n, s + 50_000))])
    index.close()


def _load(url: str, token: str, pngs: list[bytes], seconds: float, clients: int, add: bool) -> dict:
    import httpx

    stop = time.monotonic() + seconds
    lat, errors, added, add_lat = [], [], [], []
    lock = threading.Lock()

    def searcher(cid: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            i = cid
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.post("/v1/search", files={"image": ("q.png", pngs[i % len(pngs)], "image/png")}, data={"k": "10"})
                with lock:
                    (lat if r.status_code == 200 else errors).append((time.perf_counter() - t) * 1000)
                i += clients

    def adder() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            i = 0
            while time.monotonic() < stop:
                rid = f"load-{add}-{i}-{time.monotonic_ns()}"
                t = time.perf_counter()
                r = c.post("/v1/references", files={"image": ("r.png", pngs[i % len(pngs)], "image/png")},
                           data={"id": rid})
                with lock:
                    if r.status_code == 201:
                        added.append(rid)
                        add_lat.append((time.perf_counter() - t) * 1000)
                    else:
                        errors.append(r.status_code)
                i += 1

    threads = [threading.Thread(target=searcher, args=(c,)) for c in range(clients)]
    threads += [threading.Thread(target=adder)] if add else []
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"searches_per_s": len(lat) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "errors": len(errors),
            "adds_per_s": len(added) / wall, "add_p99_ms": pct(add_lat, 99) if add_lat else None, "added": added}


def part2(args: argparse.Namespace) -> list[dict]:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench_retrieval_"))
    t = time.perf_counter()
    make_service_index(tmp / "idx", args.service_n, args.service_factory)
    print(f"\nservice index: {args.service_n:,} vectors, {args.service_factory} ({time.perf_counter() - t:.1f} s)",
          flush=True)
    token, port = "bench-token", _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFPERC_TOKEN": token, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT)}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "diffperc.retrieval.cli", "serve", "--index", str(tmp / "idx"),
                             "--port", str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        pngs = _digit_pngs(64)
        rows = []
        for add in (False, True):
            r = _load(url, token, pngs, args.seconds, clients=8, add=add)
            added = r.pop("added")
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
                missing = sum(c.get(f"/v1/references/{rid}").status_code != 200 for rid in added)
            r.update({"load": "8 searchers" + (" + 1 adder" if add else ""), "acknowledged_adds": len(added),
                      "acknowledged_missing": missing})
            rows.append(r)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    return rows


def print_part2(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nService on 127.0.0.1 ({args.service_n:,} x 512-d {args.service_factory}, digits VAE + W, bearer auth), "
          f"{args.seconds:.0f} s per row (baseline: no adds)")
    print("| load | searches/s | p50 ms | p99 ms | adds/s | add p99 ms | errors | acknowledged adds missing |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        add_p99 = f"{r['add_p99_ms']:.1f}" if r["add_p99_ms"] is not None else "-"
        print(f"| {r['load']} | {r['searches_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['adds_per_s']:.1f} | {add_p99} | {r['errors']} | {r['acknowledged_missing']} |")
    if len(rows) == 2:
        print(f"search throughput with adds / without: {rows[1]['searches_per_s'] / rows[0]['searches_per_s']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="database vectors (issue: 1,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--flat-single", type=int, default=100,
                        help="single queries timed on the exact Flat baseline (each scans all N vectors)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise norm around a cluster centre")
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm of a query around its origin")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4 sqrt(N), a power of 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--service-n", type=int, default=100_000)
    parser.add_argument("--service-factory", default="HNSW32", help="index of the service (efSearch 128)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each service load")
    parser.add_argument("--skip-indexes", action="store_true")
    parser.add_argument("--skip-service", action="store_true")
    parser.add_argument("--backends", action="store_true", help="also compare the service's backends, FAISS vs "
                        "Milvus Lite, through OriginIndex / MilvusIndex (needs pymilvus and milvus-lite)")
    parser.add_argument("--backend-n", type=int, default=100_000, help="database vectors of the backend comparison")
    parser.add_argument("--backend-single", type=int, default=300, help="batch-1 queries timed per backend")
    parser.add_argument("--backend-filter", nargs="*", default=None, help="only backends whose label contains one")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    results: dict = {"args": vars(args)}
    if not args.skip_indexes:
        results["indexes"] = part1(args)
        print_part1(results["indexes"], args)
    if not args.skip_service:
        results["service"] = part2(args)
        print_part2(results["service"], args)
    if args.backends:
        results["backends"] = part3(args)
        print_part3(results["backends"], args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
