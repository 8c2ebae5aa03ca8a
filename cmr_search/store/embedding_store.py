"""The ``views`` and ``studies`` embedding tables (DESIGN.md, data flow step 2).

Every row carries ``vec_id`` (a stable 63-bit hash of its key, the FAISS id of its vector)
and ``rev`` (a random id of the commit that wrote it): an index compares ``(vec_id, rev)``
pairs with the ones it was built from to apply exactly the rows that changed. Withdrawal of
studies from every table and index lives above both, in ``withdrawal.py``.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
from lancedb.index import BTree

from cmr_search.core.exceptions import InputError, StoreError, WithdrawnError
from cmr_search.core.layout import StoreLayout
from cmr_search.store.clip_store import ClipStore, sql_quote
from cmr_search.store.lease import StudyWriteLock
from cmr_search.store.models import pull_model, pull_models
from cmr_search.store.tombstones import Tombstones

__all__ = ["EMBEDDING_TABLES", "FILTER_FIELDS", "EmbeddingStore", "StoreConfig", "studies_schema", "vec_id",
           "vec_ids", "views_schema"]

log = logging.getLogger(__name__)

#: embedding table -> its row key (one row per key and model_id)
EMBEDDING_TABLES = {"views": "clip_id", "studies": "study_uid"}

FILTER_FIELDS = [
    pa.field("sex", pa.string()),
    pa.field("age", pa.float32()),
    pa.field("vendor", pa.string()),
    pa.field("site", pa.string()),
    pa.field("study_date", pa.string()),
]
_ID_FIELDS = [pa.field("vec_id", pa.int64(), nullable=False), pa.field("rev", pa.int64(), nullable=False)]


def vec_id(key: str) -> int:
    """Stable 63-bit id of a row key (``clip_id`` or ``study_uid``): the FAISS id of its vector."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def vec_ids(keys: list[str]) -> np.ndarray:
    """``vec_id`` of many keys as an int64 array."""
    return np.fromiter((vec_id(k) for k in keys), np.int64, len(keys))


def views_schema(dim: int = 512) -> pa.Schema:
    """One row per (clip, model)."""
    return pa.schema([
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("patient_key", pa.string(), nullable=False),
        pa.field("view", pa.string(), nullable=False),
        pa.field("slice_index", pa.int16()),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        *FILTER_FIELDS,
        *_ID_FIELDS,
        pa.field("embedded_at", pa.timestamp("ms", tz="UTC")),
    ])


def studies_schema(dim: int = 512) -> pa.Schema:
    """One row per (study, model): the attention-pooled study embedding and what went into it."""
    return pa.schema([
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("patient_key", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("views_present", pa.list_(pa.string())),
        pa.field("n_views", pa.int16()),
        pa.field("clip_ids", pa.list_(pa.string())),
        pa.field("attention", pa.list_(pa.float32())),  # pooling weight of each clip_ids entry
        *FILTER_FIELDS,
        *_ID_FIELDS,
        pa.field("embedded_at", pa.timestamp("ms", tz="UTC")),
    ])


@dataclass(frozen=True)
class StoreConfig:
    """Upkeep of the embedding tables."""

    compact_fragments: int = 32  # compact a table once it holds more fragments than this
    keep_versions_days: float = 7.0  # versions older than this are pruned at compaction
    key_index_rows: int = 10_000  # index the key column (B-tree) once a table holds this many rows


class EmbeddingStore:
    """The store's embedding tables; rows are keyed by (key, model_id) so models never mix.

    Readers see the newest committed version on every read (the connection's read
    consistency interval is zero); a commit is atomic, so a read never sees half of one.
    """

    def __init__(self, clip_store: ClipStore, dim: int = 512, config: StoreConfig = StoreConfig()):
        self.clip_store, self.dim, self.config = clip_store, dim, config
        self.root = clip_store.root
        self.layout = StoreLayout(self.root)

    @classmethod
    def open(cls, root: Path, dim: int = 512, config: StoreConfig = StoreConfig()) -> EmbeddingStore:
        """Open the embedding tables of an existing store. (A withdrawal a crash interrupted is
        finished by ``withdrawal.finish_pending_withdrawals``, which the entry points that
        search or write call; opening alone changes nothing.) On object storage the shared
        ``DEFAULT``/``LATEST`` and their models are copied to this machine (``store.models``)."""
        store = cls(ClipStore.open(root), dim, config)
        pull_models(store.layout)
        return store

    # -- tables ---------------------------------------------------------------------------
    def schema(self, name: str) -> pa.Schema:
        """Schema of ``views`` or ``studies``."""
        if name not in EMBEDDING_TABLES:
            raise InputError(f"no embedding table {name!r}; use one of {', '.join(EMBEDDING_TABLES)}")
        return views_schema(self.dim) if name == "views" else studies_schema(self.dim)

    def has(self, name: str) -> bool:
        """Whether the table exists yet."""
        return self.clip_store.has_table(name)

    def table(self, name: str):
        """The Lance table ``views`` or ``studies`` (created empty on first use)."""
        table = self.clip_store.db.create_table(name, schema=self.schema(name), exist_ok=True)
        if "vec_id" not in table.schema.names:
            raise StoreError(f"the {name} table of {self.root} predates vec_id/rev columns; remove "
                             f"{self.layout.table(name)} and run `cmr embed --store {self.root}` again")
        return table

    @property
    def views(self):
        """The ``views`` Lance table."""
        return self.table("views")

    @property
    def studies(self):
        """The ``studies`` Lance table."""
        return self.table("studies")

    def version(self, name: str) -> int:
        """The table's current (newest committed) version."""
        return self.table(name).version

    def versions(self, name: str) -> list[dict]:
        """The table's kept versions: ``{"version", "timestamp"}`` oldest first."""
        return [{"version": v["version"], "timestamp": v["timestamp"]} for v in self.table(name).list_versions()]

    def count(self, name: str, model_id: str | None = None) -> int:
        """Rows in a table, optionally of one model."""
        if not self.has(name):
            return 0
        return self.table(name).count_rows(f"model_id = '{sql_quote(self.vectors_of(model_id))}'" if model_id else None)

    def vectors_of(self, model_id: str) -> str:
        """The ``model_id`` whose rows hold ``model_id``'s embeddings: its own, or for a
        text-aligned model (``cmr train-text``) the video model's. Every read by model goes
        through it, so such a model searches, takes heads and is evaluated on the vectors it
        shares, with no copy of them."""
        if not self.layout.local:  # on object storage its VECTORS pointer comes with the model's copy
            pull_model(self.layout, model_id)
        return self.layout.vectors_model_id(model_id)

    def model_ids(self, name: str = "studies") -> dict[str, int]:
        """model_id -> row count in the table."""
        if not self.has(name):
            return {}
        ids = self.table(name).search().select(["model_id"]).limit(None).to_arrow()["model_id"]
        values, counts = np.unique(np.asarray(ids.to_pylist(), dtype=object), return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}

    # -- writes ---------------------------------------------------------------------------
    def upsert(self, name: str, rows: list[dict] | pa.Table) -> tuple[int, int]:
        """Insert or replace rows (dicts, or an Arrow table for bulk loads) by (key, model_id)
        in one commit; returns (inserted, updated). ``vec_id``, ``rev`` and ``embedded_at``
        are filled in here."""
        if not len(rows):
            return 0, 0
        key, schema = EMBEDDING_TABLES[name], self.schema(name)
        now, rev = datetime.now(UTC), secrets.randbits(63)
        if isinstance(rows, pa.Table):
            n = rows.num_rows
            filled = {"vec_id": pa.array(vec_ids(rows[key].to_pylist())), "rev": pa.array(np.full(n, rev, np.int64)),
                      "embedded_at": pa.array([now] * n, schema.field("embedded_at").type)}
            columns = [filled[f.name] if f.name in filled else
                       (rows[f.name].cast(f.type) if f.name in rows.column_names else pa.nulls(n, f.type)) for f in schema]
            data = pa.Table.from_arrays(columns, schema=schema)
        else:
            rows = [r | {"vec_id": vec_id(r[key]), "rev": rev, "embedded_at": r.get("embedded_at") or now} for r in rows]
            data = pa.Table.from_pylist(rows, schema=schema)
        table = self.table(name)
        result = table.merge_insert([key, "model_id"]).when_matched_update_all().when_not_matched_insert_all().execute(data)
        self.clip_store.committed(dict(zip(data["study_uid"].to_pylist(), data["patient_key"].to_pylist())))
        self._maybe_compact(table)
        return int(result.num_inserted_rows), int(result.num_updated_rows)

    def upsert_views(self, rows: list[dict]) -> tuple[int, int]:
        """Insert or replace view rows by (clip_id, model_id), one commit."""
        return self.upsert("views", rows)

    def upsert_studies(self, rows: list[dict]) -> tuple[int, int]:
        """Insert or replace study rows by (study_uid, model_id), one commit."""
        return self.upsert("studies", rows)

    def commit_views(self, rows: list[dict], clips_read: dict[str, object]) -> tuple[int, int]:
        """Upsert view rows derived from clips, under the write lock, keeping only those whose
        clip is still stored as it was read (``clips_read``: clip_id -> its ``ingested_at``):
        a clip withdrawn or replaced since gets no view. Returns (written, dropped)."""
        with self.write_lock():
            current = self._current_clips([r["clip_id"] for r in rows])
            keep = [r for r in rows if r["clip_id"] in current and current[r["clip_id"]] == clips_read[r["clip_id"]]]
            self.upsert_views(keep)
            return len(keep), len(rows) - len(keep)

    def commit_studies(self, rows: list[dict], views_read: dict[str, int]) -> tuple[int, int]:
        """Upsert study rows pooled from view rows, under the write lock, keeping only those
        whose pooled clips are all still stored in that study, each with the very view row
        that was read (``views_read``: clip_id -> its ``rev``). Returns (written, dropped)."""
        if not rows:
            return 0, 0
        model_id = rows[0]["model_id"]
        with self.write_lock():
            clips = self.clip_store.clip_metadata(["clip_id", "study_uid"]).to_pydict()
            by_study: dict[str, set[str]] = {}
            for clip_id, uid in zip(clips["clip_id"], clips["study_uid"]):
                by_study.setdefault(uid, set()).add(clip_id)
            views = self.rows("views", model_id, ["clip_id", "rev"]).to_pydict()
            revs = dict(zip(views["clip_id"], views["rev"]))
            keep = [r for r in rows if set(r["clip_ids"]) <= by_study.get(r["study_uid"], set())
                    and all(revs.get(c) == views_read.get(c) for c in r["clip_ids"])]
            self.upsert_studies(keep)
            return len(keep), len(rows) - len(keep)

    def _current_clips(self, clip_ids: list[str]) -> dict[str, object]:
        """clip_id -> ``ingested_at`` of those of these clips the store holds now."""
        if not clip_ids:
            return {}
        where = "clip_id IN (" + ", ".join(f"'{sql_quote(c)}'" for c in clip_ids) + ")"
        rows = self.clip_store.clips.search().where(where).select(["clip_id", "ingested_at"]).limit(None).to_arrow()
        return dict(zip(rows["clip_id"].to_pylist(), rows["ingested_at"].to_pylist()))

    def write_lock(self) -> StudyWriteLock:
        """The store-wide lock of every commit of study rows (``ClipStore.write_lock``)."""
        return self.clip_store.write_lock()

    def put_study(self, clip_rows: list[dict], view_rows: list[dict], study_row: dict) -> bool:
        """Store one study's clips and one model's embeddings of them as all the store holds
        of that study; returns whether it replaced a stored one.

        A replacement drops the clips the study no longer has, and every other model's
        embeddings of it (they describe the old pixels; ``cmr embed`` makes them anew). If a
        write fails, the study's rows are put back as they were (or removed, if it is new),
        so nothing is half-stored; other studies' rows are never touched.
        """
        with self.write_lock():
            uid = study_row["study_uid"]
            if Tombstones(self.layout).withdrawn([uid], {uid: study_row["patient_key"]}):
                raise WithdrawnError(f"study {uid} was withdrawn from {self.root}; it is not stored again unless "
                                     f"an operator readmits it (`cmr delete --store {self.root} --readmit --study {uid}`)")
            return self._put_study(clip_rows, view_rows, study_row)

    def _put_study(self, clip_rows: list[dict], view_rows: list[dict], study_row: dict) -> bool:
        where = f"study_uid = '{sql_quote(study_row['study_uid'])}'"
        before = {name: self.clip_store.db.open_table(name).search().where(where).limit(None).to_arrow()
                  for name in ("clips", "views", "studies") if self.has(name)}
        replaced = "clips" in before and before["clips"].num_rows > 0
        keep = ", ".join(f"'{sql_quote(r['clip_id'])}'" for r in clip_rows)
        model = f"'{sql_quote(study_row['model_id'])}'"
        try:
            self.clip_store.upsert_clips(clip_rows)  # a re-uploaded study is replaced whole
            self.upsert_views(view_rows)
            self.upsert_studies([study_row])
            if replaced:
                self.clip_store.clips.delete(f"{where} AND clip_id NOT IN ({keep})")
                self.views.delete(f"{where} AND (clip_id NOT IN ({keep}) OR model_id != {model})")
                self.studies.delete(f"{where} AND model_id != {model}")
        except Exception:
            log.exception("storing a study failed; putting back what the store held of it")
            for name in ("clips", "views", "studies"):
                if self.has(name):
                    table = self.clip_store.db.open_table(name)
                    table.delete(where)
                    if name in before and before[name].num_rows:
                        table.add(before[name])
            raise
        return replaced

    def _maybe_compact(self, table) -> None:
        # a B-tree on the key keeps get() fast in a large table (upserts still replace: tested)
        key = EMBEDDING_TABLES[table.name]
        if table.count_rows() >= self.config.key_index_rows and not any(key in ix.columns for ix in table.list_indices()):
            table.create_index(key, config=BTree())
        # many small merge commits leave many small fragments; reads slow down with each
        if table.stats()["fragment_stats"]["num_fragments"] > self.config.compact_fragments:
            table.optimize(cleanup_older_than=timedelta(days=self.config.keep_versions_days))

    # -- reads ----------------------------------------------------------------------------
    def get(self, name: str, key: str, model_id: str) -> dict | None:
        """One row by its key (``clip_id`` or ``study_uid``) and model, or None."""
        if not self.has(name):
            return None
        where = f"{EMBEDDING_TABLES[name]} = '{sql_quote(key)}' AND model_id = '{sql_quote(self.vectors_of(model_id))}'"
        rows = self.table(name).search().where(where).limit(1).to_list()
        return rows[0] if rows else None

    def get_study(self, study_uid: str, model_id: str) -> dict | None:
        """A study's row (vector, views, attention, filter columns) for one model, or None."""
        return self.get("studies", study_uid, model_id)

    def get_view(self, clip_id: str, model_id: str) -> dict | None:
        """A clip's view row for one model, or None."""
        return self.get("views", clip_id, model_id)

    def rows(self, name: str, model_id: str, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
        """All rows of one model (optionally only some columns, or those matching ``where``)."""
        if not self.has(name):
            return self.schema(name).empty_table() if columns is None else self.schema(name).empty_table().select(columns)
        clause = f"model_id = '{sql_quote(self.vectors_of(model_id))}'" + (f" AND ({where})" if where else "")
        q = self.table(name).search().where(clause).limit(None)
        return (q.select(columns) if columns else q).to_arrow()

    def view_rows(self, model_id: str, columns: list[str] | None = None) -> pa.Table:
        """All view rows of one model."""
        return self.rows("views", model_id, columns)

    def study_rows(self, model_id: str, columns: list[str] | None = None) -> pa.Table:
        """All study rows of one model."""
        return self.rows("studies", model_id, columns)

    def embedded_clip_ids(self, model_id: str) -> set[str]:
        """clip_ids that already have a view embedding of this model."""
        return set(self.rows("views", model_id, ["clip_id"])["clip_id"].to_pylist())

    @staticmethod
    def vectors(table: pa.Table) -> np.ndarray:
        """The ``vector`` column as a float32 [N, dim] array."""
        col = table["vector"].combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float32, copy=False)
