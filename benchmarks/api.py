"""The search service under load, against its own in-process search path, in one run.

    python benchmarks/api.py [--studies 100000] [--queries 2000] [--clients 1 8 32] [--json out.json]

A fresh store gets N synthetic study embeddings (clustered, as in benchmarks/search.py)
under an encoder saved in the store (the CPU configuration, random weights unless
``--encoder DIR`` names a trained checkpoint folder: the text tower's cost is the same).
``cmr serve`` then runs in its own process on loopback with API keys on; a client process
(aiohttp, asyncio) sends a bounded number of text queries and neighbour queries at 1, 8 and
32 concurrent clients and records each request's latency, the throughput and the errors.
The same queries go through ``SearchService`` in this process first, one at a time: the
ratio of the two is what HTTP, JSON and auth add. Client and server share the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("LANCE_LOG"):
    os.environ["LANCE_LOG"] = "error"

import numpy as np
import pyarrow as pa
from vectors import DIM, embeddings

FINDINGS = ["severe LV dilatation", "apical thrombus", "apical akinesis", "concentric hypertrophy", "septal thickening",
            "pericardial effusion", "dilated right ventricle", "reduced LVEF", "normal biventricular function",
            "left atrial enlargement", "hyperdynamic LV", "mildly impaired RV function", "asymmetric septal hypertrophy"]


def text_queries(n: int, seed: int = 0) -> list[str]:
    """Distinct report-like sentences (so no cache could answer them)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        picks = rng.choice(len(FINDINGS), 2, replace=False)
        out.append(f"{FINDINGS[picks[0]]} with {FINDINGS[picks[1]]}, study {i}")
    return out


def build_store(root: Path, n: int, encoder: Path | None) -> str:
    """A store with an encoder and N study rows of its model; returns the model_id."""
    from cmr_search.encoder.checkpoint import checkpoint_model_id, save_checkpoint
    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.model import CmrClip
    from cmr_search.store import ClipStore
    from cmr_search.store.config import IndexConfig
    from cmr_search.store.embedding_store import EmbeddingStore
    from cmr_search.store.index import VectorIndex

    store = EmbeddingStore(ClipStore.open(root, create=True))
    if encoder is not None:
        model_id = checkpoint_model_id(encoder)
        shutil.copytree(encoder, root / "encoders" / model_id)
    else:
        cfg = load_config("mvit_xs_cpu")
        tmp = root / "encoders" / "new"
        model_id = save_checkpoint(CmrClip(cfg), cfg, tmp, step=0)
        os.replace(tmp, root / "encoders" / model_id)
    (root / "encoders" / "LATEST").write_text(model_id)
    x = embeddings(n, seed=1)
    uids = [f"1.2.826.0.1.9.{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    for i in range(0, n, 100_000):
        j = min(n, i + 100_000)
        store.upsert("studies", pa.table({
            "study_uid": uids[i:j], "patient_key": [f"p{k // 2}" for k in range(i, j)], "model_id": [model_id] * (j - i),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x[i:j].reshape(-1)), DIM),
            "views_present": [["4CH", "2CH", "3CH", "SAX"]] * (j - i),
            "sex": np.where(rng.random(j - i) < 0.45, "F", "M"), "age": rng.uniform(18, 90, j - i).astype(np.float32),
        }))
    for table in ("studies", "views"):
        VectorIndex.open(store, table, model_id, IndexConfig())  # built and saved once, loaded by the server
    return model_id


def in_process(root: Path, texts: list[str], uids: list[str]) -> dict:
    """The same queries through SearchService, one at a time (no HTTP)."""
    from cmr_search.api import schemas
    from cmr_search.api.service import SearchService
    from cmr_search.api.settings import ServeSettings

    service = SearchService(ServeSettings(store=root, check_interval_s=0))
    service.warm()
    out = {}
    for kind, items in (("text", texts), ("neighbors", uids)):
        times = []
        for item in items:
            t0 = time.perf_counter()
            if kind == "text":
                service.search_text(schemas.TextQuery(query=item, k=10))
            else:
                service.neighbors(item, 10, schemas.Filters(), False)
            times.append(time.perf_counter() - t0)
        out[kind] = {"p50_ms": 1e3 * float(np.percentile(times, 50)), "p99_ms": 1e3 * float(np.percentile(times, 99)),
                     "qps": len(items) / sum(times)}
    return out


async def load(base: str, key: str, kind: str, items: list[str], clients: int) -> dict:
    """``clients`` concurrent workers share the items; every request's latency is kept."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"}
    queue = list(reversed(items))
    latencies, errors = [], 0

    async def worker(session):
        nonlocal errors
        while queue:
            item = queue.pop()
            t0 = time.perf_counter()
            if kind == "text":
                request = session.post("/search/text", json={"query": item, "k": 10})
            else:
                request = session.get(f"/studies/{item}/neighbors", params={"k": 10})
            async with request as r:
                await r.read()
            latencies.append(time.perf_counter() - t0)
            errors += r.status != 200

    # aiohttp: the client shares the 2 cores with the server, and costs about a third of httpx
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "errors": errors, "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
            "p99_ms": 1e3 * float(np.percentile(latencies, 99)), "qps": len(latencies) / wall}


def client_main(args) -> None:
    """The load generator (run as its own process): prints one JSON line of results."""
    import uvloop  # installed with uvicorn[standard]; the client's CPU is CPU the server does not get

    uvloop.install()
    items = json.loads(Path(args.items).read_text())
    results = []
    for clients in args.clients:
        for kind in ("neighbors", "text"):
            results.append({"kind": kind, **asyncio.run(load(args.base, args.key, kind, items[kind], clients))})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps(results))


def serve_and_load(root: Path, work: Path, key: str, workers: int, args) -> list[dict]:
    """Start ``cmr serve`` with this many workers, run the client process against it, stop it."""
    import httpx

    port = _free_port()
    env = os.environ | {"CMR_STORE": str(root), "CMR_PORT": str(port), "CMR_SERVE_WORKERS": str(workers)}
    if args.search_threads:
        env["CMR_SEARCH_THREADS"] = str(args.search_threads)
    if args.index_threads:
        env["CMR_INDEX_THREADS"] = str(args.index_threads)
    cmr = Path(sys.executable).with_name("cmr")
    server = subprocess.Popen([str(cmr), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # readyz answers 200 once every worker is warm
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        print(f"server with {workers} worker(s) ready", file=sys.stderr, flush=True)
        client = subprocess.run([sys.executable, __file__, "--client", "--base", base, "--key", key,
                                 "--items", str(work / "items.json"), "--clients", *map(str, args.clients)],
                                stdout=subprocess.PIPE, check=True)
        return json.loads(client.stdout)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000, help="of each kind, per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--encoder", type=Path, help="a trained checkpoint folder (default: random weights)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="uvicorn worker processes (one run each)")
    parser.add_argument("--search-threads", type=int, default=None, help="CMR_SEARCH_THREADS for the server")
    parser.add_argument("--index-threads", type=int, default=None, help="CMR_INDEX_THREADS for the server")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--items", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)

    work = args.work or Path(tempfile.mkdtemp(prefix="cmr-api-bench-"))
    root = work / "store"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    model_id = build_store(root, args.studies, args.encoder)
    print(f"store of {args.studies} studies built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rng = np.random.default_rng(7)
    items = {"text": text_queries(args.queries),
             "neighbors": [f"1.2.826.0.1.9.{i}" for i in rng.integers(0, args.studies, args.queries)]}
    (work / "items.json").write_text(json.dumps(items))
    out = {"studies": args.studies, "queries": args.queries, "model_id": model_id,
           "in_process": in_process(root, items["text"], items["neighbors"])}
    print(f"in process: {out['in_process']}", file=sys.stderr, flush=True)

    from cmr_search.api.auth import KeyRing

    key, _ = KeyRing(root).create("read", "benchmark")
    out["service"] = []
    for workers in args.workers:
        rows = serve_and_load(root, work, key, workers, args)
        out["service"] += [{"workers": workers, **row} for row in rows]
    for row in out["service"]:
        row["p50_ratio"] = row["p50_ms"] / out["in_process"][row["kind"]]["p50_ms"]
    print(f"\n{'kind':<10} {'workers':>7} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6} "
          f"{'p50 / in-process':>17}")
    for kind in ("neighbors", "text"):
        ref = out["in_process"][kind]
        print(f"{kind:<10} {'in-process':>15} {ref['p50_ms']:>8.2f} {ref['p99_ms']:>8.2f} {ref['qps']:>8.0f}")
        for row in (r for r in out["service"] if r["kind"] == kind):
            print(f"{kind:<10} {row['workers']:>7} {row['clients']:>7} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                  f"{row['qps']:>8.0f} {row['errors']:>6} {row['p50_ratio']:>17.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
