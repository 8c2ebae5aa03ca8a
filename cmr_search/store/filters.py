"""Metadata filters for searches: a SQL ``WHERE`` clause over the rows an index holds,
joined with the store's label table, evaluated by DuckDB on Arrow in memory.

Columns: every column of the embedding table but the vector (``view``, ``slice_index``,
``sex``, ``age``, ``vendor``, ``site``, ``study_date``, ``views_present``, ...) and every
label column (``lvef``, ``dcm``, ...); a label column that repeats a DICOM one is dropped.
The connection has no file or network access, so a clause can only read these rows.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

import duckdb
import numpy as np
import pyarrow as pa

from cmr_search.core.exceptions import InputError

__all__ = ["FilterFrame", "mentions"]


def mentions(where: str, columns: set[str]) -> bool:
    """Whether a clause names any of these columns (string literals ignored)."""
    bare = re.sub(r"'(?:[^']|'')*'", "''", where)
    return any(re.search(rf"\b{re.escape(c)}\b", bare) for c in columns)


class FilterFrame:
    """The filterable rows of one index at one version; ``ids(where)`` gives the sorted
    vec_ids that match (cached per clause, since clinicians repeat their filters)."""

    def __init__(self, meta: pa.Table, labels: pa.Table | None = None, cache_size: int = 64):
        self._con = duckdb.connect(config={"enable_external_access": False})
        self._con.execute("SET lock_configuration = true")
        self._con.register("meta_rows", meta)
        self.columns = set(meta.column_names)
        sql = "SELECT vec_id FROM meta_rows"
        if labels is not None and "study_uid" in labels.column_names:
            keep = [c for c in labels.column_names if c == "study_uid" or c not in self.columns]
            self._con.register("label_rows", labels.select(keep))
            self.columns |= set(keep)
            sql += " LEFT JOIN label_rows USING (study_uid)"
        self._sql = sql
        self._lock = threading.Lock()  # one DuckDB connection: one query at a time
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def ids(self, where: str) -> np.ndarray:
        """Sorted vec_ids of the rows matching ``where``."""
        where = where.strip()
        if ";" in re.sub(r"'(?:[^']|'')*'", "''", where):
            raise InputError(f"filter {where!r}: one SQL condition only (no ';')")
        with self._lock:
            if where in self._cache:
                self._cache.move_to_end(where)
                return self._cache[where]
            try:
                found = self._con.execute(f"{self._sql} WHERE ({where})").fetchnumpy()["vec_id"]
            except duckdb.Error as error:
                message = str(error).splitlines()[0]
                raise InputError(f"filter {where!r} cannot be used: {message}. Columns: "
                                 f"{', '.join(sorted(self.columns - {'vec_id', 'rev'}))}") from error
            ids = np.unique(np.asarray(found, np.int64))
            self._cache[where] = ids
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return ids
