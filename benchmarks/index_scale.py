"""Index builds at scale: memory and time of a rebuild a batch at a time against the
all-in-memory rebuild it replaced, side by side in one run (issue 27, item 3).

    python benchmarks/index_scale.py [--sizes 200000 1000000] [--batch 4096] [--json out.json]

Per size N: N random unit 512-d float32 vectors are written to a fresh store's ``studies``
table (a real Lance table in a temporary folder, 100k rows a commit). Then each index kind
(exact ``flat``, forced at any size; ``ivf``, the default above 20k rows) is built by each
path, every build in a fresh process so its peak resident memory is its own:

- ``memory``: what a rebuild did before: the whole table (metadata and vectors) read and
  sorted by ``vec_id``, then ``build_index`` over the array;
- ``chunked``: ``VectorIndex.sync`` now: the ids, then the IVF trained on its sample
  (fetched by row id) and every row added ``--batch`` at a time, the metadata read whole.

Printed per build: peak RSS and its rise over the process's RSS before the build, the
memory the index keeps resident (handed back when it is dropped), the index's bytes
(``index_bytes``: vectors, ids, centroids) and its serialized size, build seconds; and per
kind, memory per million vectors (the index resident, and each path's peak rise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("LANCE_LOG"):
    os.environ["LANCE_LOG"] = "error"

import numpy as np
import pyarrow as pa

from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore

MODEL, DIM, COMMIT = "bench", 512, 100_000
KINDS, PATHS = ("flat", "ivf"), ("memory", "chunked")
MIB = 2**20


def write_table(root: Path, n: int, seed: int = 0) -> None:
    """A fresh store with ``n`` random unit vectors in ``studies``, written a commit at a time."""
    shutil.rmtree(root, ignore_errors=True)
    fill_table(EmbeddingStore(ClipStore.open(root, create=True)), n, seed)


def fill_table(store: EmbeddingStore, n: int, seed: int = 0) -> None:
    """``n`` random unit vectors into the ``studies`` table of ``store``, a commit at a time."""
    for lo in range(0, n, COMMIT):
        hi = min(n, lo + COMMIT)
        x = np.random.default_rng([seed, lo]).standard_normal((hi - lo, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        uids = [f"1.2.3.{i}" for i in range(lo, hi)]
        store.upsert("studies", pa.table({
            "study_uid": uids, "patient_key": uids, "model_id": [MODEL] * (hi - lo),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM),
            "sex": np.where(np.arange(lo, hi) % 2, "F", "M"),
        }))


def build_once(root: Path, kind: str, path: str, batch: int) -> dict:
    """One build in this process (run as a child): its figures."""
    import faiss

    from cmr_search.store.config import IndexConfig
    from cmr_search.store.index import VectorIndex
    from cmr_search.store.index import sync as sync_module
    from cmr_search.store.index.build import build_index, index_bytes, peak_rss_bytes, rss_bytes
    from cmr_search.store.index.sync import TableSnapshot

    store = EmbeddingStore(ClipStore.open(root))
    rows = store.count("studies")
    config = IndexConfig(exact_below=rows + 1 if kind == "flat" else IndexConfig.exact_below, device="cpu")
    store.clip_store.db.open_table("studies").search().limit(1).to_arrow()  # Lance's runtime up before measuring
    before, started = rss_bytes(), time.perf_counter()
    if path == "memory":  # the rebuild as it was: keys, then every column of every row at once
        snapshot = TableSnapshot(store, "studies", MODEL)
        snapshot.pin()
        snapshot.keys()
        table = snapshot.read([*snapshot.meta_columns, "vector"]).sort_by("vec_id").combine_chunks()
        holder = build_index(EmbeddingStore.vectors(table), table["vec_id"].to_numpy(), DIM, config, None)
        meta = table.drop_columns(["vector"])
        del table
    else:
        sync_module.BUILD_BATCH = batch or sync_module.BUILD_BATCH
        holder = VectorIndex(store, "studies", MODEL, config)
        holder.sync(save=False)
        meta = holder.meta
    seconds, peak = time.perf_counter() - started, peak_rss_bytes()
    assert holder.index.ntotal == rows == meta.num_rows
    figures = {"rows": rows, "kind": kind, "path": path, "seconds": seconds, "rss_before": before, "rss_peak": peak,
               "index_bytes": index_bytes(holder.index, kind), "meta_bytes": meta.nbytes}
    figures["serialized"] = len(faiss.serialize_index(holder.index))
    # what the index keeps resident (id maps and list slack included): the memory handed
    # back when it is dropped, with the heap's free memory returned to the system either side
    _trim()
    held = rss_bytes()
    del holder
    _trim()
    figures["index_resident"] = held - rss_bytes()
    return figures


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the figure keeps whatever the allocator holds
        pass


def run_child(root: Path, kind: str, path: str, batch: int) -> dict:
    """``build_once`` in a fresh interpreter, so the peak RSS is that build's alone."""
    out = subprocess.run([sys.executable, __file__, "--child", str(root), kind, path, str(batch)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: list[dict]) -> None:
    """The table of builds, then memory per million vectors per kind."""
    print("| rows | kind | path | build s | peak RSS MiB | peak rise MiB | index resident MiB | index MiB | serialized MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['kind']} | {r['path']} | {r['seconds']:.1f} | {r['rss_peak'] / MIB:,.0f} | "
              f"{(r['rss_peak'] - r['rss_before']) / MIB:,.0f} | {r['index_resident'] / MIB:,.0f} | "
              f"{r['index_bytes'] / MIB:,.0f} | {r['serialized'] / MIB:,.0f} |")
    print("\nper million vectors (MiB): resident = what the built index holds; peak = the build's rise")
    print("| rows | kind | index bytes | resident | peak, memory path | peak, chunked path |")
    print("|---|---|---|---|---|---|")
    by = {(r["rows"], r["kind"], r["path"]): r for r in results}
    for rows, kind in sorted({(r["rows"], r["kind"]) for r in results}):
        per = 1e6 / rows / MIB
        mem, chunked = by[(rows, kind, "memory")], by[(rows, kind, "chunked")]
        print(f"| {rows:,} | {kind} | {chunked['index_bytes'] * per:,.0f} | "
              f"{chunked['index_resident'] * per:,.0f} | "
              f"{(mem['rss_peak'] - mem['rss_before']) * per:,.0f} | {(chunked['rss_peak'] - chunked['rss_before']) * per:,.0f} |")


def main() -> None:
    """Write each size's table, build every kind by both paths, print the figures."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        root, kind, path, batch = sys.argv[2:6]
        print(json.dumps(build_once(Path(root), kind, path, int(batch))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000])
    ap.add_argument("--batch", type=int, default=0, help="rows a chunked build reads and adds at once (0: sync.BUILD_BATCH)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--work", type=Path, default=None, help="folder for the stores (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="index-scale-"))
    results = []
    try:
        for n in args.sizes:
            started = time.perf_counter()
            write_table(work / f"store-{n}", n)
            print(f"[{n}] table written in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            for kind in args.kinds:
                for path in PATHS:
                    results.append(run_child(work / f"store-{n}", kind, path, args.batch))
                    r = results[-1]
                    print(f"[{n}] {kind} {path}: {r['seconds']:.1f} s, peak {r['rss_peak'] / MIB:,.0f} MiB",
                          file=sys.stderr, flush=True)
            shutil.rmtree(work / f"store-{n}", ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
