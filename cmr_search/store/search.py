"""Search one store's embeddings of one model: by vector, by study (scan-to-scan), by text.

Study level searches the ``studies`` table; a filter that names a view column (``view``,
``slice_index``, ``clip_id``) searches the ``views`` table and returns each study once,
with its best-matching view. Hits carry no patient key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cmr_search.core.exceptions import InputError, StoreError
from cmr_search.core.layout import StoreLayout
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore, vec_id
from cmr_search.store.filters import FilterFrame, mentions
from cmr_search.store.index import VectorIndex
from cmr_search.store.withdrawal import finish_pending_withdrawals, forget_withdrawn

__all__ = ["Hit", "Searcher", "TextEncoder", "default_model_id"]

#: ``(model_id, texts) -> [N, 512]`` unit float32 embeddings by that model's text tower; the
#: caller supplies it (``cmr_search.encoder.embed.TextQueryEncoder``), so the store never loads a model
TextEncoder = Callable[[str, list[str]], np.ndarray]

VIEW_COLUMNS = {"view", "slice_index", "clip_id"}
_HIT_FIELDS = ("views_present", "sex", "age", "vendor", "site", "study_date")
_HIT_COLUMNS = ("study_uid", "clip_id", "view", "slice_index", *_HIT_FIELDS)


@dataclass(slots=True)
class Hit:
    """One result: a study, its similarity, and (for view-level searches) its best view."""

    study_uid: str
    score: float
    clip_id: str | None = None
    view: str | None = None
    slice_index: int | None = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def default_model_id(store: EmbeddingStore) -> str:
    """The model to search: the store's default (``cmr encoders set-default``; the first model
    embedded) when it has study embeddings, else (a store from before defaults) its latest
    trained encoder, else the only model that has them."""
    present = store.model_ids("studies")
    if not present:
        raise StoreError(f"{store.root} has no study embeddings; run `cmr embed --store {store.root}` first")
    layout = StoreLayout(store.root)
    for model_id in (layout.default_model_id(), layout.latest_model_id()):
        if model_id and store.vectors_of(model_id) in present:
            return model_id
    if len(present) == 1:
        return next(iter(present))
    raise InputError(f"{store.root} holds embeddings of several models ({', '.join(sorted(present))}) and no "
                     f"default among them; name one with --model-id, or set one with `cmr encoders set-default ID "
                     f"--store {store.root}`")


class Searcher:
    """Indexes of one model over one store, opened lazily and kept current.

    Before each search the table's version is compared with the index's (at most every
    ``check_interval_s``, 0 = every search); if the table moved on, the index applies
    the difference first, so a search never answers from a stale index. Text queries go
    through ``encode_text``, the caller's text encoder; without one, text search says so.
    Opening one first finishes any withdrawal a crash interrupted.
    """

    def __init__(self, root: Path, model_id: str | None = None, config: IndexConfig | None = None,
                 check_interval_s: float = 0.0, encode_text: TextEncoder | None = None):
        self.store = EmbeddingStore.open(root)
        finish_pending_withdrawals(self.store)  # a crash mid-withdrawal: no search sees those studies
        self.model_id = model_id or default_model_id(self.store)
        self.config, self.check_interval_s = config or IndexConfig(), check_interval_s
        self._indexes: dict[str, VectorIndex] = {}
        self._checked: dict[str, float] = {}
        self._frames: dict[str, tuple[tuple, FilterFrame]] = {}
        self._open_lock = threading.Lock()
        self._encode_text = encode_text

    # -- indexes and filters ----------------------------------------------------------------
    def index(self, table: str) -> VectorIndex:
        """The current index of ``views`` or ``studies`` for this model."""
        with self._open_lock:
            index = self._indexes.get(table)
            if index is None:
                index = self._indexes[table] = VectorIndex.open(self.store, table, self.model_id, self.config)
                self._checked[table] = time.monotonic()
        now = time.monotonic()
        if now - self._checked[table] >= self.check_interval_s:
            if not index.is_current():
                forget_withdrawn(self.store.layout)  # shared store: another machine's withdrawal reaches our caches
                index.sync(save="background")
            self._checked[table] = now
        return index

    def refresh(self) -> None:
        """Bring every open index up to the table's newest version now (after a write)."""
        for table in list(self._indexes):
            self._checked[table] = -float("inf")
            self.index(table)

    def has_study(self, study_uid: str) -> bool:
        """Whether the study has an embedding of this model (in the current index)."""
        ids = self.index("studies").ids
        pos = np.searchsorted(ids, vec_id(study_uid))
        return bool(pos < len(ids) and ids[pos] == vec_id(study_uid))

    def _frame(self, table: str, index: VectorIndex) -> FilterFrame:
        labels = self.store.clip_store.db.open_table("labels") if self.store.has("labels") else None
        key = (index.version, labels.version if labels is not None else 0)
        cached = self._frames.get(table)
        if cached is None or cached[0] != key:
            rows = labels.to_arrow() if labels is not None else None
            cached = self._frames[table] = (key, FilterFrame(index.meta, rows))
        return cached[1]

    def warm(self) -> None:
        """Open both indexes and build their hit columns before the first search."""
        for table in ("studies", "views"):
            self.index(table).warm(_HIT_COLUMNS)

    def level_for(self, where: str | None) -> str:
        """``views`` when the filter names a view column, else ``studies``."""
        return "views" if where and mentions(where, VIEW_COLUMNS) else "studies"

    # -- queries ----------------------------------------------------------------------------
    def by_vector(self, vector: np.ndarray, k: int = 10, where: str | None = None, level: str | None = None,
                  exclude_studies: tuple[str, ...] = (), exclude_patients: tuple[str, ...] = ()) -> list[Hit]:
        """The k studies nearest to a 512-d query (inner product of unit vectors), best first."""
        if k < 1:
            raise InputError(f"k must be at least 1 (got {k})")
        level = level or self.level_for(where)
        index = self.index(level)
        allowed = self._frame(level, index).ids(where) if where else None
        excluded = self._excluded(index, level, exclude_studies, exclude_patients)
        available = (len(index) if allowed is None else len(allowed))
        fetch = k + len(excluded) if level == "studies" else 4 * k + len(excluded)
        while True:
            scores, ids, cols = index.search_one(vector, min(fetch, max(available, 1)), allowed, _HIT_COLUMNS)
            keep = ~np.isin(ids, excluded) if len(excluded) else np.ones(len(ids), bool)
            hits = self._hits(level, scores, keep, cols, k)
            if len(hits) >= k or fetch >= available:
                return hits
            fetch *= 2

    def by_study(self, study_uid: str, k: int = 10, where: str | None = None, level: str | None = None,
                 exclude_same_patient: bool = False) -> list[Hit]:
        """Scan-to-scan: the k nearest *other* studies to a stored study (its own excluded;
        with ``exclude_same_patient`` the patient's other studies too)."""
        if not self.has_study(study_uid):
            raise InputError(f"study {study_uid} has no embedding of model {self.model_id} in {self.store.root}; "
                             f"run `cmr embed --store {self.store.root}` or check the study_uid")
        index = self.index("studies")
        pos = int(np.searchsorted(index.ids, vec_id(study_uid)))
        vector = index.vector(vec_id(study_uid))
        if vector is None:  # an index that cannot give back its vectors: read the row
            vector = np.asarray(self.store.get_study(study_uid, self.model_id)["vector"], np.float32)
        patients = (index.meta["patient_key"][pos].as_py(),) if exclude_same_patient else ()
        return self.by_vector(vector, k, where, level, exclude_studies=(study_uid,), exclude_patients=patients)

    def by_text(self, text: str, k: int = 10, where: str | None = None, level: str | None = None) -> list[Hit]:
        """Text-to-scan: the k studies nearest to the encoded query text."""
        if not text or not text.strip():
            raise InputError("the text query is empty; describe the findings to look for")
        return self.by_vector(self.encode_text([text])[0], k, where, level)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Unit 512-d embeddings of texts by this model's own text tower."""
        if self._encode_text is None:
            raise InputError("this searcher was opened without a text encoder; search by study or vector, "
                             "or open it with encode_text=TextQueryEncoder(store)")
        return self._encode_text(self.model_id, list(texts))

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _excluded(index: VectorIndex, level: str, studies: tuple[str, ...], patients: tuple[str, ...]) -> np.ndarray:
        if not studies and not patients:
            return np.empty(0, np.int64)
        if level == "studies" and not patients:
            return np.asarray([vec_id(s) for s in studies], np.int64)
        mask = pc.is_in(index.meta["study_uid"], pa.array(list(studies), pa.string()))
        if patients:
            mask = pc.or_(mask, pc.is_in(index.meta["patient_key"], pa.array(list(patients), pa.string())))
        return index.meta["vec_id"].filter(mask).to_numpy()

    @staticmethod
    def _hits(level: str, scores: np.ndarray, keep: np.ndarray, cols: dict[str, list], k: int) -> list[Hit]:
        fields = [f for f in _HIT_FIELDS if f in cols]
        uids = cols["study_uid"]
        hits, seen = [], set()
        for j, (score, ok) in enumerate(zip(scores.tolist(), keep.tolist())):
            if not ok or uids[j] in seen:  # excluded; or view level: each study once, at its best view
                continue
            seen.add(uids[j])
            meta = {f: cols[f][j] for f in fields}
            if level == "views":
                hits.append(Hit(uids[j], score, cols["clip_id"][j], cols["view"][j], cols["slice_index"][j], meta))
            else:
                hits.append(Hit(uids[j], score, metadata=meta))
            if len(hits) == k:
                break
        return hits
