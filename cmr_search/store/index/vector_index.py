"""A FAISS index per (table, model_id), persisted beside the Lance table, never stale.

``VectorIndex`` opens the persisted generation (``files``), brings it to the table's
version (``sync``), and searches it: exact or IVF as ``build`` chose, on the device it
chose. Searches take a shared lock and updates an exclusive one, so API threads search
concurrently and never see an index half-updated.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, replace

import faiss
import numpy as np
import pyarrow as pa

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EMBEDDING_TABLES, EmbeddingStore
from cmr_search.store.index.build import (
    Built,
    VectorSource,
    build_from,
    gpu_device,
    ivf_lists,
    omp_threads,
    search_form,
)
from cmr_search.store.index.files import IndexFiles
from cmr_search.store.index.sync import Held, SyncReport, TableSnapshot, plan_sync
from cmr_search.store.index.torch_exact import TorchExactIndex
from cmr_search.store.shared import shared_state

__all__ = ["VectorIndex", "refresh_indexes"]

log = logging.getLogger(__name__)


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


class VectorIndex:
    """The index of one (table, model_id) with the metadata of the rows it holds.

    ``meta`` (an Arrow table sorted by ``vec_id``: every column but the vector) is read at
    the same Lance version as the vectors, so hits are named and filters evaluated on
    exactly the rows the index reflects.
    """

    def __init__(self, store: EmbeddingStore, table: str, model_id: str, config: IndexConfig = IndexConfig()):
        if table not in EMBEDDING_TABLES:
            raise StoreError(f"no embedding table {table!r}")
        # a text-aligned model searches its video model's rows, through that model's index
        self.store, self.table, self.model_id, self.config = store, table, store.vectors_of(model_id), config
        layout = StoreLayout(store.root)
        self.folder = layout.index(table, self.model_id)
        # on object storage the generations are shared with the store's other machines
        self.files = IndexFiles(self.folder, shared_state(layout), layout.key(self.folder))
        self.dim = store.dim
        self._lock = _RWLock()
        self._sync_lock = threading.Lock()
        self._save_lock = threading.Lock()  # one save at a time
        self._gpu = gpu_device(config)
        self._gpu_res = None
        self._gpu_lock = threading.Lock()  # GPU indexes are not thread-safe: one search at a time
        omp_threads(config.threads)
        self.version = -1
        self._handle = None  # the Lance table, for version checks
        self._seen_mtime, self._seen_version = None, -1  # see is_current
        versions = layout.table_versions(table)  # None on object storage: is_current asks Lance
        self._versions_dir = None if versions is None else str(versions)
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
        gen = self.files.load(self.dim)
        if gen is None:
            return
        self.index, self.kind, self.trained_rows = gen.index, gen.meta["kind"], gen.meta["trained_rows"]
        self.version, self.ids, self.revs = gen.meta["version"], gen.ids, gen.revs
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
            self.files.write(blob, ids, revs, meta)

    def save_in_background(self) -> threading.Thread:
        """``save`` on a thread, so the search that found the table moved on does not wait
        for a large index to reach the disk (a later open repairs whatever a crash loses)."""
        thread = threading.Thread(target=self.save, name=f"save-{self.table}", daemon=True)
        thread.start()
        return thread

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
            mtime = os.stat(self._versions_dir).st_mtime_ns if self._versions_dir else None
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
            snapshot = TableSnapshot(self.store, self.table, self.model_id)
            version = snapshot.version
            if version == self.version and self.index is not None and self.meta.num_rows == len(self.ids):
                return SyncReport("current", version, len(self.ids))  # (a loaded index reads its meta below)
            snapshot.pin()  # read meta and vectors at one version
            ids, revs = snapshot.keys()
            held = Held(self.index, self.kind, self.trained_rows, self.ids, self.revs, self.meta)
            plan = plan_sync(snapshot, held, ids, revs, self.config, self._build)
            with self._lock.write():  # index, ids and meta change together: a search sees before or after
                rebuilt = plan.apply(self.index)
                if rebuilt is not None:
                    self.index, self.kind, self.trained_rows = rebuilt.index, rebuilt.kind, rebuilt.trained_rows
                self.meta, self.ids, self.revs, self.version = plan.meta, ids, revs, version
                self._columns = {}  # columns_for's per-version cache
                self._set_search_index()
            report = plan.report
            report.version, report.rows, report.seconds = version, len(ids), time.perf_counter() - started
            if save and report.action != "current":
                self.save_in_background() if save == "background" else self.save()
            log.info("index %s/%s: %s", self.table, self.model_id, report)
            return report

    def _build(self, source: VectorSource) -> Built:
        """A new index over the source's rows, as this index's config and device call for."""
        return build_from(source, self.dim, self.config, self._gpu)

    def _set_search_index(self) -> None:
        self._search_index, self._gpu_res = search_form(self.index, self.kind, self.config, self._gpu, self._gpu_res)

    # -- searching --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nlist(self) -> int:
        """IVF lists (0 for exact indexes)."""
        return ivf_lists(self.index, self.kind)

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
        omp_threads(self.config.threads)
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

    # -- naming the hits --------------------------------------------------------------------
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


def refresh_indexes(store: EmbeddingStore, config: IndexConfig = IndexConfig()) -> list[SyncReport]:
    """Bring every persisted index of the store to its table's version (after a write or a
    withdrawal; ``save`` drops older generations, so withdrawn vectors leave the disk). On
    object storage the shared generations too: each index this machine or the bucket holds
    is shared at the new version, which deletes the older generations from the bucket."""
    reports = []
    layout = StoreLayout(store.root)
    shared = shared_state(layout)
    for table in EMBEDDING_TABLES:
        base = layout.indexes / table
        models = {folder.name for folder in base.glob("*") if folder.is_dir()} if base.exists() else set()
        if shared is not None:
            depth = layout.key(base).count("/") + 1
            models |= {key.split("/")[depth] for key in shared.list(layout.key(base)) if key.count("/") > depth}
        for model_id in sorted(models):
            # maintenance runs on the CPU: only the persisted form matters
            index = VectorIndex.open(store, table, model_id, replace(config, device="cpu"), sync=False)
            reports.append(index.sync())
            if shared is not None:
                index.files.push()  # where this version was already here (no save), the bucket still moves on
    return reports
