"""Bringing an index to its table's version: what changed, and a delta or a rebuild.

Each row carries ``vec_id`` and ``rev`` (the commit that wrote it). The table's pairs,
compared with those the index was built from, give the removed, added and rewritten rows;
their vectors and metadata are read through the few ``rev``s that wrote them, the other
rows' metadata is kept. A difference touching more than ``rebuild_fraction`` of the rows,
a size across the exact/IVF line or an IVF grown ``regrow_factor`` times since training
rebuilds instead. Planning reads and builds outside the index's lock; applying is quick.
A rebuild reads the vectors a batch at a time (``TableSource``) and the metadata whole,
since the index keeps the metadata in memory anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cmr_search.core.exceptions import StoreError
from cmr_search.store.clip_store import sql_quote
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.index.build import BuildStats, Built, VectorSource

__all__ = ["Held", "SyncPlan", "SyncReport", "TableSnapshot", "TableSource", "needs_rebuild", "plan_sync"]

log = logging.getLogger(__name__)

#: rows a rebuild reads and adds at once (8 MiB of 512-d float32). Lance's buffers for a
#: take are not handed back to the system at once, so the resident memory a read adds grows
#: with the batch: 62 / 156 / 392 MiB at 4k / 8k / 32k rows, measured at 200k rows, where
#: 4k rows a take read the table as fast as larger ones (0.7 s; docs/BENCHMARKS.md)
BUILD_BATCH = 4096


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
    build: BuildStats | None = None  # a rebuild's time and memory


class TableSnapshot:
    """One model's rows of an embedding table at the table's newest version (``pin`` holds
    that version, so metadata and vectors are read from the same commit)."""

    def __init__(self, store: EmbeddingStore, table: str, model_id: str):
        self.store, self.table, self.model_id = store, table, model_id
        self.handle = store.clip_store.db.open_table(table) if store.has(table) else None
        self.version = self.handle.version if self.handle is not None else 0

    def pin(self) -> None:
        """Read at ``version`` from now on, whatever commits follow."""
        if self.handle is not None:
            self.handle.checkout(self.version)

    @property
    def meta_columns(self) -> list[str]:
        """Every column but the vector."""
        return [c for c in self.store.schema(self.table).names if c != "vector"]

    def read(self, columns: list[str], where: str | None = None, row_ids: bool = False) -> pa.Table:
        """These columns of the model's rows (optionally those matching ``where``; with
        ``row_ids``, Lance's ``_rowid`` too)."""
        if self.handle is None:
            return self.store.schema(self.table).empty_table().select(columns)
        query = self.handle.search().where(self._clause(where)).select(columns).limit(None)
        return (query.with_row_id(True) if row_ids else query).to_arrow()

    def take(self, row_ids: np.ndarray, columns: list[str]) -> pa.Table:
        """These columns of the rows with these Lance row ids (in no particular order)."""
        return self.handle.take_row_ids(row_ids.tolist()).select(columns).to_arrow()

    def _clause(self, where: str | None) -> str:
        return f"model_id = '{sql_quote(self.model_id)}'" + (f" AND ({where})" if where else "")

    def meta(self) -> pa.Table:
        """All the model's metadata, sorted by ``vec_id``."""
        return _sorted(self.read(self.meta_columns))

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(vec_ids sorted, the rev of each)."""
        keys = self.read(["vec_id", "rev"]).sort_by("vec_id")
        ids, revs = keys["vec_id"].to_numpy(), keys["rev"].to_numpy()
        if len(np.unique(ids)) != len(ids):
            raise StoreError(f"duplicate vec_id in {self.table} of model {self.model_id}; run `cmr embed` again")
        return ids, revs


class TableSource:
    """A snapshot's vectors for a build (``build.VectorSource``), fetched by Lance row id a
    batch at a time, for the training sample and then for every row in the table's order,
    so a build never holds the whole table. (A scan would not do: Lance reads a whole data
    page to return any row of it, and one commit's vectors are one page, 200 MB for 100k
    rows; a take reads just the rows asked for.)"""

    def __init__(self, snapshot: TableSnapshot, ids: np.ndarray, batch_size: int | None = None):
        self.snapshot, self.ids, self.rows, self.batch_size = snapshot, ids, len(ids), batch_size or BUILD_BATCH
        self._row_ids: np.ndarray | None = None

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """The vectors of ``ids[positions]`` (``ids`` sorted), in that order."""
        out = np.empty((len(positions), self.snapshot.store.dim), np.float32)
        for lo in range(0, len(positions), self.batch_size):
            part = positions[lo : lo + self.batch_size]
            vectors, vids = self._take(self._lance_rows()[part])
            order = np.argsort(vids)
            out[lo : lo + len(part)] = vectors[order[np.searchsorted(vids, self.ids[part], sorter=order)]]
        return out

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vectors, vec_ids) of every row, ``batch_size`` at a time, in the table's order."""
        if not self.rows:  # (maybe no table at all)
            return
        rows = np.sort(self._lance_rows())  # neighbouring rows are read together
        for lo in range(0, self.rows, self.batch_size):
            yield self._take(rows[lo : lo + self.batch_size])

    def _lance_rows(self) -> np.ndarray:
        """The Lance row id of each of ``ids``."""
        if self._row_ids is None:
            keys = self.snapshot.read(["vec_id"], row_ids=True).sort_by("vec_id")
            if not np.array_equal(keys["vec_id"].to_numpy(), self.ids):  # never expected: the snapshot is pinned
                raise StoreError(f"{self.snapshot.table} changed under a pinned read; run the sync again")
            self._row_ids = keys["_rowid"].to_numpy()
        return self._row_ids

    def _take(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        got = self.snapshot.take(row_ids, ["vec_id", "vector"])
        if got.num_rows != len(row_ids):
            raise StoreError(f"{self.snapshot.table}: {len(row_ids) - got.num_rows} rows missing from a pinned read; "
                             "run the sync again")
        return EmbeddingStore.vectors(got), got["vec_id"].to_numpy()


@dataclass(frozen=True)
class Held:
    """What an index holds now (``index`` None before the first build or load; ``meta``
    has no rows for a loaded index until its first sync reads them)."""

    index: object | None
    kind: str
    trained_rows: int
    ids: np.ndarray
    revs: np.ndarray
    meta: pa.Table


@dataclass
class SyncPlan:
    """What brings an index to the table's rows: a report, the metadata of those rows, and
    either a rebuilt index or the rows to remove and add."""

    report: SyncReport
    meta: pa.Table
    rebuilt: Built | None = None
    gone: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    vectors: np.ndarray | None = None
    vids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def apply(self, index) -> Built | None:
        """Under the index's write lock: the rebuilt index, or None after removing and adding
        the changed rows of ``index`` in place."""
        if self.rebuilt is not None:
            return self.rebuilt
        if len(self.gone):
            index.remove_ids(self.gone)
        if len(self.vids):
            index.add_with_ids(self.vectors, self.vids)
        return None


def needs_rebuild(held: Held, rows: int, touched: int, config: IndexConfig) -> bool:
    """Whether a difference of ``touched`` rows, leaving ``rows``, calls for a new index."""
    if held.index is None:
        return True
    if touched > config.rebuild_fraction * max(len(held.ids), 1) and touched > 1000:
        return True
    if held.kind == "flat" and rows >= config.exact_below:
        return True
    return bool(held.kind == "ivf" and (rows < config.exact_below / 2 or rows > config.regrow_factor * held.trained_rows))


def plan_sync(snapshot: TableSnapshot, held: Held, ids: np.ndarray, revs: np.ndarray, config: IndexConfig,
              build: Callable[[VectorSource], Built]) -> SyncPlan:
    """The plan from ``held`` to the snapshot's (ids, revs); a rebuild is built here, before
    the lock, by ``build(source)`` from a ``TableSource``."""
    plan = _plan(snapshot, held, ids, revs, config, build)
    if not np.array_equal(plan.meta["vec_id"].to_numpy(), ids):  # never expected; the full read is always right
        log.warning("index %s/%s: metadata out of step, read again", snapshot.table, snapshot.model_id)
        plan.meta = snapshot.meta()
    return plan


def _plan(snapshot: TableSnapshot, held: Held, ids: np.ndarray, revs: np.ndarray, config: IndexConfig,
          build: Callable[[VectorSource], Built]) -> SyncPlan:
    old_ids, old_revs = held.ids, held.revs
    have_meta = held.index is not None and held.meta.num_rows == len(old_ids)  # a loaded index has none yet
    removed = np.setdiff1d(old_ids, ids, assume_unique=True)
    added = np.setdiff1d(ids, old_ids, assume_unique=True)
    common, i_old, i_new = np.intersect1d(old_ids, ids, assume_unique=True, return_indices=True)
    updated = common[old_revs[i_old] != revs[i_new]]
    touched = len(removed) + len(added) + len(updated)
    if not touched and held.index is not None:
        return SyncPlan(SyncReport("current", 0, len(ids)), held.meta if have_meta else snapshot.meta())
    counts = {"added": len(added), "removed": len(removed), "updated": len(updated)}
    with_vector = [*snapshot.meta_columns, "vector"]
    if needs_rebuild(held, len(ids), touched, config):
        built = build(TableSource(snapshot, ids))
        return SyncPlan(SyncReport("rebuilt", 0, len(ids), **counts, build=built.stats), snapshot.meta(), rebuilt=built)
    fresh = np.concatenate([added, updated])
    gone = np.concatenate([removed, updated])
    if len(fresh):  # the new rows, found through the few commits that wrote them
        wanted_revs = np.unique(revs[np.searchsorted(ids, fresh)])
        rows = snapshot.read(with_vector, f"rev IN ({', '.join(map(str, wanted_revs))})")
        rows = rows.filter(pa.array(np.isin(rows["vec_id"].to_numpy(), fresh)))
    else:
        rows = snapshot.read(with_vector, "false")
    if have_meta:
        kept = held.meta.filter(pa.array(~np.isin(old_ids, gone)))
        meta = _sorted(pa.concat_tables([kept, rows.drop_columns(["vector"])]))
    else:
        meta = snapshot.meta()
    return SyncPlan(SyncReport("delta", 0, len(ids), **counts), meta, gone=gone,
                    vectors=EmbeddingStore.vectors(rows), vids=rows["vec_id"].to_numpy())


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("vec_id").combine_chunks()
