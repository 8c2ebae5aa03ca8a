"""A store on object storage shared by machines (issue 27, item 2), against an S3-compatible
server on loopback (moto, started here), in one run:

- **a second machine's index**: ``VectorIndex.open`` from a fresh state folder, which downloads
  the generation machine A shared, against machine A building it from the bucket's table,
  and against the same build from a local store's table (the reference: what a store on
  local disk pays);
- **the write lock of a commit**: acquire and release of the study-write lock on the bucket
  (the local file lock and the lease object) against a local store's file lock;
- **a tombstone check** (what every commit of study rows does under that lock): one GET of
  the shared object against reading the local file.

    python benchmarks/shared_store.py [--studies 100000] [--repeat 3]

moto answers on loopback in a few milliseconds a request; real S3 adds 10-50 ms to each, so
the per-commit figures here are a floor, the index download a ceiling of what a LAN gives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("LANCE_LOG"):
    os.environ["LANCE_LOG"] = "error"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # index_scale's table writer
sys.path.insert(0, str(HERE.parent / "tests"))  # the test suite's moto launcher

from index_scale import MODEL, fill_table
from s3 import start_s3

from cmr_search.core.layout import StoreLayout
from cmr_search.core.location import store_root
from cmr_search.store import ClipStore
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.index import VectorIndex
from cmr_search.store.tombstones import Tombstones

CONFIG = IndexConfig(device="cpu")


def timed(fn) -> tuple[float, object]:
    """Seconds of one call of ``fn``, and what it returned."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def build(root: Path) -> tuple[float, float, VectorIndex]:
    """Seconds to build the studies index from the table (no persisted generation used) and
    to save it (on object storage: upload it and move the shared CURRENT)."""
    index = VectorIndex(EmbeddingStore(ClipStore.open(root)), "studies", MODEL, CONFIG)
    built, _ = timed(lambda: index.sync(save=False))
    saved, _ = timed(index.save)
    return built, saved, index


def second_machine(uri: str, work: Path) -> tuple[float, VectorIndex]:
    """Seconds until a fresh state folder's index of the store is ready (joined, the shared
    generation downloaded, synced to the table)."""
    folder = work / f"machine-{time.monotonic_ns()}"

    def ready() -> VectorIndex:
        return VectorIndex.open(EmbeddingStore(ClipStore.open(store_root(uri, folder))), "studies", MODEL, CONFIG)

    seconds, index = timed(ready)
    shutil.rmtree(folder, ignore_errors=True)
    return seconds, index


def per_call(fn, n: int = 20) -> float:
    """Milliseconds per call of ``fn``, the fastest of ``n`` calls after one to warm up."""
    fn()
    return min(timed(fn)[0] for _ in range(n)) * 1000


def locked(store: ClipStore) -> None:
    with store.write_lock():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000, help="rows of the studies table (512-d vectors)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cmr-shared-"))
    server = start_s3(bucket="cmr-bench")
    os.environ.update(server.env)
    try:
        uri = server.uri(prefix="registry")
        machine_a, local = store_root(uri, work / "machine-a"), work / "local"
        for root in (machine_a, local):
            fill_table(EmbeddingStore(ClipStore.open(root, create=True)), args.studies)
        remote, local_build = [], []
        for _ in range(args.repeat):  # interleaved: the machine's speed drifts
            built, saved, index = build(machine_a)
            remote.append((built, saved))
            local_build.append(build(local)[0])
        downloads = [second_machine(uri, work) for _ in range(args.repeat)]
        assert all(i.files.downloaded for _, i in downloads), "machine B rebuilt instead of downloading"
        assert all(len(i) == args.studies for _, i in downloads)
        best_remote, best_save = min(b for b, _ in remote), min(s for _, s in remote)
        best_local, best_b = min(local_build), min(s for s, _ in downloads)
        size = sum(p.stat().st_size for p in (StoreLayout(machine_a).index("studies", MODEL)).rglob("*") if p.is_file())
        print(f"index of {args.studies:,} studies ({size / 2**20:.0f} MiB on disk, {index.kind}): machine B ready in "
              f"{best_b:.2f} s (joined, generation downloaded, synced) against building it from the bucket's table "
              f"{best_remote:.2f} s ({best_b / best_remote:.2f}x) and from a local table {best_local:.2f} s "
              f"({best_b / best_local:.2f}x); machine A's save and upload {best_save:.2f} s", flush=True)
        shared, own = ClipStore.open(machine_a), ClipStore.open(local)
        lock_s3, lock_local = per_call(lambda: locked(shared)), per_call(lambda: locked(own))
        print(f"study-write lock, acquire and release: {lock_s3:.1f} ms on the bucket (file lock and lease) against "
              f"{lock_local:.2f} ms for a local store's file lock", flush=True)
        check_s3 = per_call(lambda: Tombstones(shared.layout).withdrawn(["1.2.3.4"]))
        check_local = per_call(lambda: Tombstones(own.layout).withdrawn(["1.2.3.4"]))
        print(f"tombstone check: {check_s3:.1f} ms on the bucket against {check_local:.3f} ms locally", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
