"""Search speed and recall at archive scale: our store's search path against raw FAISS with
the same index, LanceDB's own IVF_PQ index and numpy brute force, side by side in one run.

    python benchmarks/search.py [--sizes 100000 300000 1000000] [--queries 1000] [--json out.json]

Per size N: N x 512 unit embeddings drawn with cluster structure (clusters of uneven size
and spread, queries from the same distribution, never in the table) are bulk-upserted into
a fresh store (rows/s); the index is built (seconds, size); then 1k single queries (p50 and
p99 latency) and batches of 64 (queries/s), each with recall@10 against exact search.
"Ours" is `Searcher.by_vector` (version check, FAISS, hits named from the metadata) for
single queries and `VectorIndex.search` for batches. Last, 10k new rows are upserted and
the time until the index reflects them is measured. An nprobe sweep shows where the
default comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("LANCE_LOG"):
    os.environ["LANCE_LOG"] = "error"

import faiss
import numpy as np
import pyarrow as pa
from vectors import DIM, embeddings, exact, latency, qps, recall

from cmr_search.store import ClipStore
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.index import VectorIndex
from cmr_search.store.search import Searcher

MODEL = "bench"


def rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_size(n: int, n_queries: int, k: int, work: Path, lance_ivfpq: bool) -> dict:
    """Every figure for one archive size."""
    out: dict = {"rows": n}
    data = embeddings(n + n_queries + 10_000, seed=n)
    x, queries, extra = data[:n], data[n : n + n_queries], data[n + n_queries :]
    uids = np.array([f"1.2.3.{i}" for i in range(n + 10_000)], dtype=object)
    root = work / f"store-{n}"
    shutil.rmtree(root, ignore_errors=True)
    store = EmbeddingStore(ClipStore.open(root, create=True))

    def table_of(lo: int, hi: int, vectors: np.ndarray) -> pa.Table:
        return pa.table({
            "study_uid": pa.array(uids[lo:hi].tolist()), "patient_key": pa.array(uids[lo:hi].tolist()),
            "model_id": pa.array([MODEL] * (hi - lo)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
            "sex": pa.array(np.where(np.arange(lo, hi) % 2, "F", "M")),
        })

    t0 = time.perf_counter()
    for i in range(0, n, 100_000):
        store.upsert("studies", table_of(i, min(n, i + 100_000), x[i : i + 100_000]))
    out["upsert_rows_per_s"] = n / (time.perf_counter() - t0)
    print(f"[{n}] stored in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    cfg = IndexConfig()
    t0 = time.perf_counter()
    index = VectorIndex.open(store, "studies", MODEL, cfg)
    out["ours_build_s"] = time.perf_counter() - t0  # reads the table, trains, adds, saves
    out["index_kind"], out["nlist"], out["nprobe"] = index.kind, index.nlist, cfg.nprobe
    out["index_mb"] = len(faiss.serialize_index(index.index)) / 2**20
    print(f"[{n}] {index.kind} index (nlist {index.nlist}) built in {out['ours_build_s']:.1f} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    truth_rows = exact(x, queries, k)
    out["exact_all_queries_s"] = time.perf_counter() - t0
    # the store's row order differs from x: map both to vec_ids
    vec_of_row = store.rows("studies", MODEL, ["study_uid", "vec_id"])
    by_uid = dict(zip(vec_of_row["study_uid"].to_pylist(), vec_of_row["vec_id"].to_pylist()))
    row_vec = np.array([by_uid[u] for u in uids[:n]], np.int64)
    truth = row_vec[truth_rows]

    raw = index.index  # the very FAISS object our path searches
    if index.kind == "ivf":  # where the default nprobe comes from
        sweep = {}
        ivf = faiss.extract_index_ivf(raw)
        for p in (8, 16, 24, 32, 48, 64):
            ivf.nprobe = p
            p50, _, res = latency(lambda q: raw.search(q[None], k)[1][0], queries[:300])
            sweep[p] = {"recall": recall(np.array(res), truth[:300]), "p50_ms": p50}
        ivf.nprobe = cfg.nprobe
        out["nprobe_sweep"] = sweep

    searcher = Searcher(root, MODEL, cfg)
    searcher.warm()  # steady state: hit columns built before timing (a service does this at start-up)
    for name, interval in (("ours", 0.0), ("ours_check_1s", 1.0)):
        searcher.check_interval_s = interval
        p50, p99, res = latency(lambda q: searcher.by_vector(q, k), queries)
        ids = np.array([[by_uid[h.study_uid] for h in hits] for hits in res])
        out[name] = {"recall": recall(ids, truth), "p50_ms": p50, "p99_ms": p99,
                     "qps_64": qps(lambda b: index.search(b, k), queries)}
    p50, p99, res = latency(lambda q: raw.search(q[None], k)[1][0], queries)
    out["faiss"] = {"recall": recall(np.array(res), truth), "p50_ms": p50, "p99_ms": p99,
                    "qps_64": qps(lambda b: raw.search(b, k), queries)}
    nq = min(n_queries, 200)  # brute force is slow: fewer single queries
    p50, p99, res = latency(lambda q: np.argpartition(-(x @ q), k)[:k], queries[:nq])
    out["numpy"] = {"recall": recall(np.array([row_vec[r] for r in res]), truth[:nq]), "p50_ms": p50, "p99_ms": p99,
                    "qps_64": qps(lambda b: np.argpartition(-(b @ x.T), k, axis=1)[:, :k], queries[:256])}
    out["ratio_ours_to_faiss_p50"] = out["ours"]["p50_ms"] / out["faiss"]["p50_ms"]
    out["ratio_ours_check_1s_to_faiss_p50"] = out["ours_check_1s"]["p50_ms"] / out["faiss"]["p50_ms"]
    print(f"[{n}] ours {out['ours']}, faiss {out['faiss']}", file=sys.stderr, flush=True)

    if lance_ivfpq:
        table = store.table("studies")
        partitions = max(16, int(np.sqrt(n)))
        t0 = time.perf_counter()
        table.create_index(metric="dot", vector_column_name="vector", index_type="IVF_PQ",
                           num_partitions=partitions, num_sub_vectors=64, max_iterations=10, sample_rate=64)
        out["lance_build_s"] = time.perf_counter() - t0

        nprobes = max(32, partitions // 8)  # about as large a share of the lists as our IVF visits

        def lance_search(q):
            return table.search(q, vector_column_name="vector").distance_type("dot").nprobes(nprobes).refine_factor(40) \
                .select(["vec_id"]).limit(k).to_arrow()["vec_id"].to_numpy()

        p50, p99, res = latency(lance_search, queries[:nq])
        out["lance_ivf_pq"] = {"recall": recall(np.array(res), truth[:nq]), "p50_ms": p50, "p99_ms": p99,
                               "qps_64": qps(lambda b: [lance_search(q) for q in b], queries[:128]),
                               "partitions": partitions, "sub_vectors": 64, "nprobes": nprobes, "refine_factor": 40,
                               "kmeans_iterations": 10, "sample_rate": 64}
        print(f"[{n}] lance {out['lance_ivf_pq']}", file=sys.stderr, flush=True)

    # freshness: 10k new rows, then a search that must see them
    t0 = time.perf_counter()
    store.upsert("studies", table_of(n, n + 10_000, extra))
    out["upsert_10k_s"] = time.perf_counter() - t0
    searcher.check_interval_s = 0.0
    t0 = time.perf_counter()
    hits = searcher.by_vector(extra[0], 1)
    out["index_reflects_10k_s"] = time.perf_counter() - t0
    out["new_row_found"] = hits[0].study_uid == uids[n]
    out["peak_rss_mb"] = rss_mb()
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--no-lance", action="store_true", help="skip LanceDB's IVF_PQ (its build is slow)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cmr-search-bench-"))
    results = {"machine": f"{os.cpu_count()} cores, faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}",
               "sizes": [run_size(n, args.queries, args.k, work, not args.no_lance) for n in args.sizes]}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"{'rows':>9} {'path':<14} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8} {'QPS(64)':>9} {'build s':>8}")
    for r in results["sizes"]:
        for name in ("ours", "ours_check_1s", "faiss", "lance_ivf_pq", "numpy"):
            if name in r:
                f = r[name]
                build = {"ours": r["ours_build_s"], "lance_ivf_pq": r.get("lance_build_s")}.get(name)
                print(f"{r['rows']:>9} {name:<14} {f['recall']:>9.3f} {f['p50_ms']:>8.3f} {f['p99_ms']:>8.3f} "
                      f"{f['qps_64']:>9.0f} {'' if build is None else f'{build:8.1f}'}")
        print(f"{'':>9} ours/faiss p50 {r['ratio_ours_to_faiss_p50']:.2f}x (check every search), "
              f"{r['ratio_ours_check_1s_to_faiss_p50']:.2f}x (check every 1 s); upsert {r['upsert_rows_per_s']:.0f} rows/s; "
              f"10k new rows searchable after {r['upsert_10k_s']:.2f} s upsert + {r['index_reflects_10k_s']:.2f} s index delta")


if __name__ == "__main__":
    main()
