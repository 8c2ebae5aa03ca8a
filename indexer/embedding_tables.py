"""The ``views`` and ``studies`` embedding tables (DESIGN.md, data flow step 2).

A minimal writer and reader used by ``cmr embed``; the FAISS index, deletes and the
search API over these tables belong to the embedding-store issue and build on this class.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from indexer.clip_store import ClipStore, _quote

__all__ = ["FILTER_FIELDS", "EmbeddingTables", "studies_schema", "views_schema"]

FILTER_FIELDS = [
    pa.field("sex", pa.string()),
    pa.field("age", pa.float32()),
    pa.field("vendor", pa.string()),
    pa.field("site", pa.string()),
    pa.field("study_date", pa.string()),
]


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
        pa.field("embedded_at", pa.timestamp("ms", tz="UTC")),
    ])


class EmbeddingTables:
    """The store's embedding tables; rows are keyed by (id, model_id) so models never mix."""

    def __init__(self, store: ClipStore, dim: int = 512):
        self.store, self.dim = store, dim

    def _table(self, name: str):
        schema = views_schema(self.dim) if name == "views" else studies_schema(self.dim)
        return self.store.db.create_table(name, schema=schema, exist_ok=True)

    @property
    def views(self):
        """The ``views`` Lance table."""
        return self._table("views")

    @property
    def studies(self):
        """The ``studies`` Lance table."""
        return self._table("studies")

    def _upsert(self, name: str, key: str, rows: list[dict]) -> None:
        if not rows:
            return
        now = datetime.now(UTC)
        for r in rows:
            r.setdefault("embedded_at", now)
        schema = views_schema(self.dim) if name == "views" else studies_schema(self.dim)
        data = pa.Table.from_pylist(rows, schema=schema)
        self._table(name).merge_insert([key, "model_id"]).when_matched_update_all() \
            .when_not_matched_insert_all().execute(data)

    def upsert_views(self, rows: list[dict]) -> None:
        """Insert or replace view rows by (clip_id, model_id), one commit."""
        self._upsert("views", "clip_id", rows)

    def upsert_studies(self, rows: list[dict]) -> None:
        """Insert or replace study rows by (study_uid, model_id), one commit."""
        self._upsert("studies", "study_uid", rows)

    def embedded_clip_ids(self, model_id: str) -> set[str]:
        """clip_ids that already have a view embedding of this model."""
        if not self.store.has_table("views"):
            return set()
        t = self.views.search().where(f"model_id = '{_quote(model_id)}'").select(["clip_id"]).limit(None).to_arrow()
        return set(t["clip_id"].to_pylist())

    def view_rows(self, model_id: str, columns: list[str] | None = None) -> pa.Table:
        """All view rows of one model."""
        q = self.views.search().where(f"model_id = '{_quote(model_id)}'").limit(None)
        return (q.select(columns) if columns else q).to_arrow()

    def study_rows(self, model_id: str, columns: list[str] | None = None) -> pa.Table:
        """All study rows of one model."""
        q = self.studies.search().where(f"model_id = '{_quote(model_id)}'").limit(None)
        return (q.select(columns) if columns else q).to_arrow()

    @staticmethod
    def vectors(table: pa.Table) -> np.ndarray:
        """The ``vector`` column as a float32 [N, dim] array."""
        col = table["vector"].combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
