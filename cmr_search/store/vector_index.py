"""A FAISS index per (table, model_id), persisted beside the Lance table, never stale.

The index stores each row's stable ``vec_id``; beside it lie the ``(vec_id, rev)`` pairs
and the Lance version it reflects. ``sync`` compares those with the table's current rows
and applies the difference (removed, added and rewritten rows), or rebuilds when the
difference is large or the size calls for another index type. Exact inner product below
``exact_below`` rows, IVF-Flat above; on a GPU through faiss' GPU build when present, else
an exact torch matmul + top-k. Searches take a shared lock and updates an exclusive one,
so API threads search concurrently and never see an index half-updated.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from cmr_search.core.exceptions import StoreError
from cmr_search.store.clip_store import _quote, process_alive
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EMBEDDING_TABLES, EmbeddingStore
from cmr_search.store.torch_exact import TorchExactIndex

__all__ = ["IndexConfig", "SyncReport", "VectorIndex", "refresh_indexes"]

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    """What ``sync`` did to bring the index to the table's version."""

    action: str  # current | delta | rebuilt
    version: int
    rows: int
    added: int = 0
    removed: int = 0
    updated: int = 0
    seconds: float = 0.0


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_thread_state = threading.local()


def _omp_threads(threads: int | None) -> None:
    """Limit FAISS' OpenMP threads in the calling thread. OpenMP keeps this setting per
    thread: set in one thread only, every API worker thread would still fork a team of all
    cores per search (measured: 5 ms of CPU per 1 ms query under 8 concurrent requests)."""
    if threads and getattr(_thread_state, "omp", None) != threads:
        faiss.omp_set_num_threads(threads)
        _thread_state.omp = threads


def _gpu_device(config: IndexConfig) -> str | None:
    """'faiss' or 'torch' when searches should run on a GPU, else None."""
    if config.device == "cpu":
        return None
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return "faiss"
    import torch

    if torch.cuda.is_available():
        return "torch"
    if config.device == "cuda":
        raise StoreError("device 'cuda' asked for, but neither faiss nor torch sees a GPU; use device 'auto' or 'cpu'")
    return None


class VectorIndex:
    """The index of one (table, model_id) with the metadata of the rows it holds.

    ``meta`` (an Arrow table sorted by ``vec_id``: every column but the vector) is read at
    the same Lance version as the vectors, so hits are named and filters evaluated on
    exactly the rows the index reflects.
    """

    def __init__(self, store: EmbeddingStore, table: str, model_id: str, config: IndexConfig = IndexConfig()):
        if table not in EMBEDDING_TABLES:
            raise StoreError(f"no embedding table {table!r}")
        self.store, self.table, self.model_id, self.config = store, table, model_id, config
        self.folder = store.root / "indexes" / table / model_id
        self.dim = store.dim
        self._lock = _RWLock()
        self._sync_lock = threading.Lock()
        self._save_lock = threading.Lock()  # one save at a time
        self._gpu = _gpu_device(config)
        self._gpu_lock = threading.Lock()  # GPU indexes are not thread-safe: one search at a time
        _omp_threads(config.threads)
        self.version = -1
        self._handle = None  # the Lance table, for version checks
        self._seen_mtime, self._seen_version = None, -1  # see is_current
        self._versions_dir = str(store.root / "lance" / f"{table}.lance" / "_versions")
        self.index = None  # faiss index (CPU; the persisted form) or TorchExactIndex
        self._search_index = None  # what searches use: the CPU index, its GPU clone, or TorchExactIndex
        self.kind = "empty"
        self.trained_rows = 0
        self.meta: pa.Table = pa.table({"vec_id": pa.array([], pa.int64()), "rev": pa.array([], pa.int64())})
        self.ids = np.empty(0, np.int64)  # sorted vec_ids
        self.revs = np.empty(0, np.int64)  # rev of each id
        self._columns: dict = {}  # per-version object arrays for columns_for ("__names__": the table's columns)
        self._columns_building = None  # the meta whose columns are being built
        self._columns_thread: threading.Thread | None = None

    # -- opening and persistence ------------------------------------------------------------
    @classmethod
    def open(cls, store: EmbeddingStore, table: str, model_id: str, config: IndexConfig = IndexConfig(),
             sync: bool = True) -> VectorIndex:
        """Load the persisted index (if any) and bring it to the table's current version."""
        index = cls(store, table, model_id, config)
        if index._gpu != "torch":
            index._load()
        if sync:
            index.sync()
        return index

    def _load(self) -> None:
        pointer = self.folder / "CURRENT"
        if not pointer.exists():
            return
        gen = self.folder / pointer.read_text().strip()
        try:
            meta = json.loads((gen / "meta.json").read_text())
            index = faiss.read_index(str(gen / "index.faiss"))
            ids, revs = np.load(gen / "ids.npy"), np.load(gen / "revs.npy")
        except (OSError, RuntimeError, ValueError) as error:  # damaged files: rebuilding is always safe
            log.warning("index %s unreadable (%s); it will be rebuilt", gen, error)
            return
        if meta.get("dim") != self.dim or index.ntotal != len(ids):
            log.warning("index %s does not match its table; it will be rebuilt", gen)
            return
        self.index, self.kind, self.trained_rows = index, meta["kind"], meta["trained_rows"]
        self.version, self.ids, self.revs = meta["version"], ids, revs
        self._set_search_index()

    def save(self) -> None:
        """Persist the index with the Lance version it reflects: a new generation folder,
        then an atomic switch of ``CURRENT``; a crash leaves the previous generation."""
        with self._save_lock:
            with self._lock.read():  # a consistent snapshot; searches go on meanwhile
                if self.index is None or isinstance(self.index, TorchExactIndex):
                    return
                blob = faiss.serialize_index(self.index)
                version, ids, revs = self.version, self.ids, self.revs
                meta = {"version": version, "kind": self.kind, "rows": len(ids), "dim": self.dim,
                        "trained_rows": self.trained_rows, "model_id": self.model_id, "table": self.table,
                        "config": asdict(self.config), "saved_at": time.time()}
            self._write(blob, ids, revs, meta)

    def save_in_background(self) -> threading.Thread:
        """``save`` on a thread, so the search that found the table moved on does not wait
        for a large index to reach the disk (a later open repairs whatever a crash loses)."""
        thread = threading.Thread(target=self.save, name=f"save-{self.table}", daemon=True)
        thread.start()
        return thread

    def _write(self, blob: np.ndarray, ids: np.ndarray, revs: np.ndarray, meta: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"gen-{meta['version']:08d}-{secrets.token_hex(3)}"
        tmp = self.folder / f"{name}.{os.getpid()}.tmp"
        tmp.mkdir()
        blob.tofile(tmp / "index.faiss")
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "revs.npy", revs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        os.replace(tmp, self.folder / name)
        pointer_tmp = self.folder / f"CURRENT.{os.getpid()}.tmp"
        pointer_tmp.write_text(name)
        _fsync(pointer_tmp)
        os.replace(pointer_tmp, self.folder / "CURRENT")
        for old in self.folder.iterdir():  # earlier generations and leftovers of killed saves
            if old.name in (name, "CURRENT") or (old.suffix == ".tmp" and process_alive(old.name.split(".")[-2])):
                continue  # another process's save in progress
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)

    # -- keeping up with the table ---------------------------------------------------------
    def table_version(self) -> int:
        """The Lance table's newest version (a manifest check, about 0.3 ms)."""
        if self._handle is None:
            if not self.store.has(self.table):
                return 0
            self._handle = self.store.clip_store.db.open_table(self.table)
        return self._handle.version

    def is_current(self) -> bool:
        """Whether the index reflects the table's newest version.

        Every commit adds a manifest file to the table's ``_versions`` folder, so while that
        folder's mtime is unchanged no commit happened and the Lance check (~0.3 ms) is
        skipped. The shortcut is trusted only for an mtime already older than the clock's
        coarse tick when it was seen, so a commit in the same tick is never missed.
        """
        try:
            mtime = os.stat(self._versions_dir).st_mtime_ns
        except OSError:  # not a local table (or none yet): ask Lance
            mtime = None
        if mtime is not None and mtime == self._seen_mtime:
            return self._seen_version == self.version
        version = self.table_version()
        settled = mtime is not None and time.time_ns() - mtime > 50_000_000
        self._seen_mtime, self._seen_version = (mtime if settled else None), version
        return version == self.version

    def sync(self, save: bool | str = True) -> SyncReport:
        """Bring the index to the table's newest version: nothing, a delta, or a rebuild;
        then persist it (``save``: True, False, or "background")."""
        with self._sync_lock:
            started = time.perf_counter()
            handle = self.store.clip_store.db.open_table(self.table) if self.store.has(self.table) else None
            version = handle.version if handle is not None else 0
            if version == self.version and self.index is not None and self.meta.num_rows == len(self.ids):
                return SyncReport("current", version, len(self.ids))  # (a loaded index reads its meta below)
            if handle is not None:
                handle.checkout(version)  # read meta and vectors at one version
            keys = self._read(handle, ["vec_id", "rev"]).sort_by("vec_id")
            ids, revs = keys["vec_id"].to_numpy(), keys["rev"].to_numpy()
            if len(np.unique(ids)) != len(ids):
                raise StoreError(f"duplicate vec_id in {self.table} of model {self.model_id}; run `cmr embed` again")
            report, commit, meta = self._plan(handle, ids, revs)
            if not np.array_equal(meta["vec_id"].to_numpy(), ids):  # never expected; the full read is always right
                log.warning("index %s/%s: metadata out of step, read again", self.table, self.model_id)
                meta = self._sorted(self._read(handle, self._meta_columns()))
            with self._lock.write():  # index, ids and meta change together: a search sees before or after
                commit()
                self.meta, self.ids, self.revs, self.version = meta, ids, revs, version
                self._columns = {}  # columns_for's per-version cache
                self._set_search_index()
            report.version, report.rows, report.seconds = version, len(ids), time.perf_counter() - started
            if save and report.action != "current":
                self.save_in_background() if save == "background" else self.save()
            log.info("index %s/%s: %s", self.table, self.model_id, report)
            return report

    def _read(self, handle, columns: list[str], where: str | None = None) -> pa.Table:
        if handle is None:
            return self.store.schema(self.table).empty_table().select(columns)
        clause = f"model_id = '{_quote(self.model_id)}'" + (f" AND ({where})" if where else "")
        return handle.search().where(clause).select(columns).limit(None).to_arrow()

    def _meta_columns(self) -> list[str]:
        return [c for c in self.store.schema(self.table).names if c != "vector"]

    @staticmethod
    def _sorted(table: pa.Table) -> pa.Table:
        return table.sort_by("vec_id").combine_chunks()

    def _plan(self, handle, ids: np.ndarray, revs: np.ndarray):
        """What brings the index to (ids, revs): a report, a function that applies it
        (called under the write lock; a rebuild is done before, outside the lock), and the
        metadata of (ids): the old rows kept, the new rows read with their vectors."""
        old_ids, old_revs = self.ids, self.revs
        have_meta = self.index is not None and self.meta.num_rows == len(old_ids)  # a loaded index has none yet
        removed = np.setdiff1d(old_ids, ids, assume_unique=True)
        added = np.setdiff1d(ids, old_ids, assume_unique=True)
        common, i_old, i_new = np.intersect1d(old_ids, ids, assume_unique=True, return_indices=True)
        updated = common[old_revs[i_old] != revs[i_new]]
        touched = len(removed) + len(added) + len(updated)
        if not touched and self.index is not None:
            meta = self.meta if have_meta else self._sorted(self._read(handle, self._meta_columns()))
            return SyncReport("current", 0, len(ids)), lambda: None, meta
        counts = {"added": len(added), "removed": len(removed), "updated": len(updated)}
        if self._needs_rebuild(len(ids), touched):
            rows = self._sorted(self._read(handle, [*self._meta_columns(), "vector"]))
            built = self._build(EmbeddingStore.vectors(rows), rows["vec_id"].to_numpy())

            def swap():
                self.index, self.kind, self.trained_rows = built

            return SyncReport("rebuilt", 0, len(ids), **counts), swap, rows.drop_columns(["vector"])
        fresh = np.concatenate([added, updated])
        gone = np.concatenate([removed, updated])
        if len(fresh):  # the new rows, found through the few commits that wrote them
            wanted_revs = np.unique(revs[np.searchsorted(ids, fresh)])
            rows = self._read(handle, [*self._meta_columns(), "vector"], f"rev IN ({', '.join(map(str, wanted_revs))})")
            rows = rows.filter(pa.array(np.isin(rows["vec_id"].to_numpy(), fresh)))
        else:
            rows = self._read(handle, [*self._meta_columns(), "vector"], "false")
        vectors, vids = EmbeddingStore.vectors(rows), rows["vec_id"].to_numpy()
        if have_meta:
            kept = self.meta.filter(pa.array(~np.isin(old_ids, gone)))
            meta = self._sorted(pa.concat_tables([kept, rows.drop_columns(["vector"])]))
        else:
            meta = self._sorted(self._read(handle, self._meta_columns()))

        def patch():
            if len(gone):
                self.index.remove_ids(gone)
            if len(vids):
                self.index.add_with_ids(vectors, vids)

        return SyncReport("delta", 0, len(ids), **counts), patch, meta

    def _needs_rebuild(self, rows: int, touched: int) -> bool:
        if self.index is None:
            return True
        if touched > self.config.rebuild_fraction * max(len(self.ids), 1) and touched > 1000:
            return True
        if self.kind == "flat" and rows >= self.config.exact_below:
            return True
        return bool(self.kind == "ivf" and (rows < self.config.exact_below / 2 or rows > self.config.regrow_factor * self.trained_rows))

    def _build(self, vectors: np.ndarray, ids: np.ndarray) -> tuple:
        """A new index over these vectors: (index, kind, rows trained on)."""
        n, cfg = len(ids), self.config
        if self._gpu == "torch":
            index = TorchExactIndex(self.dim, "cuda")
            index.add_with_ids(vectors, ids)
            kind = "exact-torch"
        elif n < cfg.exact_below:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))  # IDMap2: a vector by its id
            index.add_with_ids(vectors, ids)
            kind = "flat"
        else:
            nlist = cfg.nlist or 2 ** round(math.log2(4 * math.sqrt(n)))
            coarse = {"hnsw": "_HNSW32", "flat": ""}[cfg.quantizer]
            # the factory trains k-means on a flat index, then fills the HNSW graph with the centroids
            index = faiss.index_factory(self.dim, f"IVF{nlist}{coarse},Flat", faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(cfg.seed)
            sample = vectors[rng.choice(n, min(n, nlist * cfg.train_per_list), replace=False)]
            index.cp.seed, index.cp.niter = cfg.seed, cfg.kmeans_iters
            index.train(sample)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            index.add_with_ids(vectors, ids)
            index.nprobe = cfg.nprobe
            kind = "ivf"
        return index, kind, n

    def _set_search_index(self) -> None:
        if self.kind == "ivf":  # search settings are not persisted with the index: the config decides
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe, ivf.parallel_mode = self.config.nprobe, self.config.parallel_mode
            quantizer = faiss.downcast_index(ivf.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                quantizer.hnsw.efSearch = self.config.quantizer_ef
            if ivf.direct_map.type == faiss.DirectMap.NoMap:  # id -> list entry, for `vector` (kept through add/remove)
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        if self._gpu == "faiss" and self.index is not None:
            res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()
            self._gpu_res = res
            self._search_index = faiss.index_cpu_to_gpu(res, 0, self.index)
        else:
            self._search_index = self.index

    # -- searching --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nlist(self) -> int:
        """IVF lists (0 for exact indexes)."""
        return faiss.extract_index_ivf(self.index).nlist if self.kind == "ivf" else 0

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products for each query row: (scores [n, k], vec_ids [n, k]), -1 where
        fewer than k rows exist. ``allowed`` (sorted vec_ids) restricts the candidates; when
        the IVF's usual probes find fewer than k allowed rows the search widens until k are
        found or every list was visited, so a selective filter still gets k exact neighbours."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock.read():
            return self._search(queries, k, allowed, nprobe)

    def vector(self, vec_id: int) -> np.ndarray | None:
        """The stored vector of one id (scan-to-scan needs its query's vector): microseconds
        from the index, where a Lance point lookup takes milliseconds. None when this index
        cannot give it (an exact index saved by an older version), or the id is absent."""
        with self._lock.read():
            index = self.index
            if index is None:
                return None
            if isinstance(index, TorchExactIndex):
                return index.vector(vec_id)
            try:
                return index.reconstruct(int(vec_id))
            except RuntimeError:
                return None

    def search_one(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None,
                   columns: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
        """One query: (scores [m], vec_ids [m], metadata columns of those rows), the m <= k
        found, all read at one version (a concurrent sync cannot slip in between)."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        with self._lock.read():
            d, i = self._search(query, k, allowed, None)
            found = i[0] >= 0
            d, i = d[0][found], i[0][found]
            return d, i, self.columns_for(i, list(columns))

    def _search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, nprobe: int | None):
        _omp_threads(self.config.threads)
        index = self._search_index
        if index is None or not len(self.ids):
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if isinstance(index, TorchExactIndex):
            d, i = index.search(queries, k, allowed)
            return _pad(d, i, k)
        if allowed is None and nprobe is None and self._gpu is None:  # the common case: straight to FAISS
            d, i = index.search(queries, k)  # (the IVF holds its default nprobe)
            if self.kind != "ivf" or (i >= 0).all() or k > len(self.ids):
                return d, i
        n_allowed = len(self.ids) if allowed is None else len(allowed)
        want = min(k, n_allowed)
        probe = nprobe or self.config.nprobe
        if self.kind == "ivf" and allowed is not None:  # visit as many allowed rows as an unfiltered search would
            probe = math.ceil(probe * len(self.ids) / max(n_allowed, 1))
        while True:
            d, i = self._faiss_search(index, queries, k, allowed, probe)
            found = (i >= 0).sum(1).min()
            if found >= want or self.kind != "ivf" or probe >= self.nlist:
                return d, i
            probe = min(self.nlist, probe * 4)

    def _faiss_search(self, index, queries, k, allowed, nprobe):
        selector = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist), sel=selector)
        else:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        if self._gpu == "faiss":
            with self._gpu_lock:
                return index.search(queries, k, params=params)
        return index.search(queries, k, params=params)

    def columns_for(self, ids: np.ndarray, columns: list[str]) -> dict[str, list]:
        """The metadata of these vec_ids (in that order; ids must be present): column -> values
        (columns the table lacks are left out).

        After a sync the first searches take the rows from Arrow (about 0.15 ms) while a
        background thread turns the columns into Python object arrays (seconds at 1M rows);
        from then on naming the hits of a search costs microseconds."""
        pos = np.searchsorted(self.ids, ids)
        cache, meta = self._columns, self.meta
        present = [c for c in columns if c in cache.get("__names__", ())] if cache else None
        if present is not None and all(c in cache for c in present):
            return {c: cache[c][pos].tolist() for c in present}
        names = set(meta.column_names)
        self._build_columns(columns)
        return meta.select([c for c in columns if c in names]).take(pa.array(pos)).to_pydict()

    def _build_columns(self, columns: list[str]) -> None:
        """Once per version: object arrays of these columns, built off the search path."""
        if self._columns_building is self.meta:
            return
        meta = self._columns_building = self.meta

        def build():
            built = {"__names__": set(meta.column_names)}
            for c in columns:
                if c in built["__names__"]:
                    values = np.empty(meta.num_rows, object)
                    values[:] = meta[c].to_pylist()
                    built[c] = values
            if self.meta is meta:  # still the current version
                self._columns = built
            # a million long-lived str/int objects: without freezing them, every full
            # collection walks them all, a pause of tens of ms in some unlucky request
            gc.freeze()

        self._columns_thread = threading.Thread(target=build, name=f"columns-{self.table}", daemon=True)
        self._columns_thread.start()

    def warm(self, columns: tuple[str, ...]) -> None:
        """Build the hit columns now and wait for them (a service calls this at start-up,
        a benchmark before timing), so no search shares the GIL with the builder."""
        if len(self.ids):
            self.columns_for(self.ids[:1], list(columns))
        if self._columns_thread is not None:
            self._columns_thread.join()


def _pad(d: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if d.shape[1] == k:
        return d, i
    pad = k - d.shape[1]
    return (np.pad(d, ((0, 0), (0, pad)), constant_values=-np.inf), np.pad(i, ((0, 0), (0, pad)), constant_values=-1))


def _fsync(path: Path) -> None:
    with open(path, "rb") as fp:
        os.fsync(fp.fileno())


def refresh_indexes(store: EmbeddingStore, config: IndexConfig = IndexConfig()) -> list[SyncReport]:
    """Bring every persisted index of the store to its table's version (after a write or a
    withdrawal; ``save`` drops older generations, so withdrawn vectors leave the disk)."""
    reports = []
    base = store.root / "indexes"
    for table in EMBEDDING_TABLES:
        for folder in sorted((base / table).glob("*")) if (base / table).exists() else []:
            if folder.is_dir():
                # maintenance runs on the CPU: only the persisted form matters
                index = VectorIndex.open(store, table, folder.name, replace(config, device="cpu"), sync=False)
                reports.append(index.sync())
    return reports
