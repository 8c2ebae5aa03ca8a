"""Stored embeddings and labels as training data.

A study is a bag of view embeddings (padded to the longest bag, with a mask) plus its
pooled study embedding; labels come from the store's ``labels`` table or a CSV/Parquet
file keyed by ``study_uid``. Splits are by patient (``patient_key``), so no patient's
studies straddle train and test.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from sklearn.model_selection import train_test_split

from cmr_search.core.exceptions import InputError
from cmr_search.store.clip_store import read_study_table, sql_quote
from cmr_search.store.embedding_store import EmbeddingStore

__all__ = ["Bags", "LabelSet", "infer_task", "label_table", "load_bags", "load_labels", "patient_split", "sample_fraction"]

VIEW_ORDER = {"4CH": 0, "3CH": 1, "2CH": 2, "LVOT": 3, "SAX": 4}


@dataclass
class Bags:
    """The studies of one encoder model: view bags, study embeddings, who is who."""

    model_id: str
    study_uids: list[str]
    patient_keys: np.ndarray  # salted keys, for patient-level splits only
    studies: torch.Tensor  # [N, D] pooled study embeddings
    views: torch.Tensor  # [N, V, D] view embeddings, zero-padded
    mask: torch.Tensor  # [N, V] True on real views
    view_names: list[list[dict]] = field(default_factory=list)  # per study: view, slice_index, clip_id

    def __len__(self) -> int:
        return len(self.study_uids)

    def subset(self, idx: np.ndarray) -> Bags:
        """These studies only (bags trimmed to their longest)."""
        idx = np.asarray(idx, np.int64)
        t = torch.from_numpy(idx)
        v = max(int(self.mask[t].sum(1).max()), 1) if len(idx) else 1
        return Bags(self.model_id, [self.study_uids[i] for i in idx], self.patient_keys[idx], self.studies[t],
                    self.views[t, :v], self.mask[t, :v], [self.view_names[i] for i in idx] if self.view_names else [])


    def studies_only(self) -> Bags:
        """The same studies with empty view bags (one masked zero view each), for heads that read
        only the study embedding: batches then stop copying every view vector."""
        n, d = self.studies.shape
        return Bags(self.model_id, self.study_uids, self.patient_keys, self.studies, torch.zeros(n, 1, d),
                    torch.zeros(n, 1, dtype=torch.bool), self.view_names)


def load_bags(store: EmbeddingStore, model_id: str, study_uids: list[str] | None = None,
              with_views: bool = True) -> Bags:
    """Every study of ``model_id`` (or these) with its view bag; studies without views are left out.
    ``with_views=False`` reads the study embeddings alone (empty bags, as ``Bags.studies_only``) and
    keeps every study."""
    # a few studies (a prediction) are read by key, not by scanning the model's every row
    where = None
    if study_uids is not None and len(study_uids) <= 1000:
        where = "study_uid IN (" + ", ".join(f"'{sql_quote(u)}'" for u in study_uids) + ")"
    studies = store.rows("studies", model_id, ["study_uid", "patient_key", "vector"], where)
    if not studies.num_rows:  # only then is it worth a scan to say which models the store has
        have = store.model_ids("studies")
        if store.vectors_of(model_id) not in have:
            raise InputError(f"the store has no study embeddings of model {model_id}"
                             + (f" (it has {', '.join(have)})" if have else "") + "; run `cmr embed` with that encoder")
    if study_uids is not None:
        studies = studies.filter(pc.is_in(studies["study_uid"], pa.array(list(study_uids), pa.string())))
        missing = set(study_uids) - set(studies["study_uid"].to_pylist())
        if missing:
            raise InputError(f"no embedding of model {model_id} for study {min(missing)}"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + "; run `cmr embed`")
    uids = studies["study_uid"].to_pylist()
    keys = np.asarray(studies["patient_key"].to_pylist(), dtype=object)
    vectors = torch.from_numpy(np.array(EmbeddingStore.vectors(studies)))
    if not with_views:
        return Bags(model_id, uids, keys, vectors, torch.zeros(len(uids), 1, store.dim),
                    torch.zeros(len(uids), 1, dtype=torch.bool))
    position = {u: i for i, u in enumerate(uids)}
    views = store.rows("views", model_id, ["clip_id", "study_uid", "view", "slice_index", "vector"], where)
    pos = np.array([position.get(u, -1) for u in views["study_uid"].to_pylist()], np.int64)
    keep = pos >= 0
    views, pos = views.filter(pa.array(keep)), pos[keep]
    view_rank = np.array([VIEW_ORDER.get(v, 9) for v in views["view"].to_pylist()])
    slices = views["slice_index"].fill_null(-1).to_numpy(zero_copy_only=False)
    order = np.lexsort((slices, view_rank, pos))
    views, pos = views.take(pa.array(order)), pos[order]
    counts = np.bincount(pos, minlength=len(uids))
    has_views = counts > 0
    width = int(counts.max()) if len(counts) and counts.max() else 1
    slot = np.arange(len(pos)) - np.repeat(np.cumsum(counts) - counts, counts)
    d = store.dim
    padded = torch.zeros(len(uids), width, d)
    mask = torch.zeros(len(uids), width, dtype=torch.bool)
    padded[pos, slot] = torch.from_numpy(np.array(EmbeddingStore.vectors(views)))
    mask[pos, slot] = True
    names: list[list[dict]] = [[] for _ in uids]
    for p, cid, view, sl in zip(pos, views["clip_id"].to_pylist(), views["view"].to_pylist(),
                                views["slice_index"].to_pylist()):
        names[p].append({"view": view, "slice_index": sl, "clip_id": cid})
    bags = Bags(model_id, uids, keys, vectors, padded, mask, names)
    return bags if has_views.all() else bags.subset(np.flatnonzero(has_views))


@dataclass
class LabelSet:
    """Label values aligned with a Bags: [N, L] floats, NaN where missing or unusable."""

    names: list[str]
    values: np.ndarray
    task: str
    source: str  # "store" or the file's path
    sha256: str  # of the label file, or of the store's label table at its version
    problems: list[str] = field(default_factory=list)  # what was skipped, and why

    def usable(self) -> np.ndarray:
        """Rows with at least one label."""
        return ~np.isnan(self.values).all(axis=1)


def _digest_table(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def label_table(store: EmbeddingStore, path: Path | None) -> tuple[pa.Table, str, str]:
    """The label table of ``path`` (CSV/Parquet) or of the store -> (table, source, sha256)."""
    if path is not None:
        path = Path(path)
        table = read_study_table(path)
        return table, str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    clip_store = store.clip_store
    if not clip_store.has_table("labels"):
        raise InputError("the store has no label table; import one with `cmr ingest --labels FILE` or pass --labels FILE")
    table = clip_store.db.open_table("labels").to_arrow()
    return table, "store", _digest_table(table)


def _as_numbers(column: pa.ChunkedArray, name: str, uids: list[str], problems: list[str]) -> np.ndarray:
    """Floats with NaN for missing values; text that is no number is reported and left out."""
    values = column.to_pylist()
    out = np.full(len(values), np.nan)
    bad = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            bad.append(i)
            continue
        if math.isfinite(x):
            out[i] = x
        else:
            bad.append(i)
    if bad:
        problems.append(f"{name}: {len(bad)} value(s) are not numbers and were left out "
                        f"(e.g. {values[bad[0]]!r} for study {uids[bad[0]]})")
    return out


def infer_task(values: np.ndarray, names: list[str], task: str = "auto") -> str:
    """The task these values allow: binary (or multilabel) when every value is 0/1, else regression."""
    present = values[~np.isnan(values)]
    binary = bool(len(present)) and bool(np.isin(present, (0.0, 1.0)).all())
    if task == "auto":
        task = ("multilabel" if len(names) > 1 else "binary") if binary else "regression"
    if task in ("binary", "multilabel") and not binary:
        raise InputError(f"{', '.join(names)}: classification needs 0/1 values; found others "
                         f"(e.g. {present[~np.isin(present, (0.0, 1.0))][0]:g}); use --task regression or recode")
    if task == "regression" and len(names) > 1:
        raise InputError("regression takes one label; train one head per numeric column")
    if task == "binary" and len(names) > 1:
        task = "multilabel"
    return task


def load_labels(store: EmbeddingStore, bags: Bags, names: list[str], path: Path | None = None,
                task: str = "auto") -> LabelSet:
    """The ``names`` columns for the studies of ``bags`` (from ``path`` or the store)."""
    if not names:
        raise InputError("name at least one label column (--label)")
    table, source, digest = label_table(store, path)
    absent = [n for n in names if n not in table.column_names]
    if absent:
        cols = [c for c in table.column_names if c != "study_uid"]
        raise InputError(f"label column {absent[0]!r} is not in {source} (columns: {', '.join(cols)})")
    problems: list[str] = []
    uids = table["study_uid"].to_pylist()
    row_of = {}
    for i, uid in enumerate(uids):
        if uid is None:
            problems.append(f"row {i + 2}: no study_uid; skipped")
        else:
            row_of[uid] = i  # the last row of a study wins, as at import
    columns = np.stack([_as_numbers(table[n], n, uids, problems) for n in names], axis=1)
    values = np.full((len(bags), len(names)), np.nan)
    rows = np.array([row_of.get(u, -1) for u in bags.study_uids])
    values[rows >= 0] = columns[rows[rows >= 0]]
    unlabelled = int((rows < 0).sum())
    if unlabelled:
        problems.append(f"{unlabelled} embedded studies have no row in {source}; they are not used")
    without = len(set(row_of) - set(bags.study_uids))
    if without:
        problems.append(f"{without} labelled studies have no embedding of model {bags.model_id}; they are not used")
    missing = int((np.isnan(values).all(axis=1) & (rows >= 0)).sum())
    if missing:
        problems.append(f"{missing} studies have no value for {', '.join(names)}; they are not used")
    if row_of and not (rows >= 0).any():
        raise InputError(f"none of the {len(row_of)} studies of {source} has an embedding of model {bags.model_id} "
                         "in this store: are they another store's studies? Score a head there: `cmr heads export` "
                         "it, `cmr heads import` it into that store, and run `cmr heads evaluate --store THAT_STORE`")
    if not (~np.isnan(values)).any():
        raise InputError(f"no embedded study has a usable value of {', '.join(names)} in {source}")
    return LabelSet(list(names), values, infer_task(values, names, task), source, digest, problems)


def _strata(patients: np.ndarray, values: np.ndarray, task: str) -> np.ndarray:
    """One stratum per patient: positive for the rarest label (classification) or the LVEF
    quintile of the patient's mean (regression)."""
    uniq, inv = np.unique(patients, return_inverse=True)
    if task == "regression":
        mean = np.bincount(inv, weights=values[:, 0], minlength=len(uniq)) / np.bincount(inv, minlength=len(uniq))
        edges = np.quantile(mean, [0.2, 0.4, 0.6, 0.8])
        return np.searchsorted(edges, mean)
    rarest = int(np.nanargmin(np.nanmean(values, axis=0)))
    return np.bincount(inv, weights=np.nan_to_num(values[:, rarest]), minlength=len(uniq)) > 0


def _split(items: np.ndarray, strata: np.ndarray, size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """train_test_split, stratified where every stratum has two or more members."""
    _, counts = np.unique(strata, return_counts=True)
    stratify = strata if len(counts) > 1 and counts.min() >= 2 else None
    try:
        return train_test_split(items, test_size=size, random_state=seed, stratify=stratify)
    except ValueError:  # a stratum too small for the requested share
        return train_test_split(items, test_size=size, random_state=seed)


def patient_split(bags: Bags, labels: LabelSet, val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices (train, val, test) of the labelled studies, split by patient and stratified."""
    rows = np.flatnonzero(labels.usable())
    patients = bags.patient_keys[rows]
    uniq, inv = np.unique(patients, return_inverse=True)
    if len(uniq) < 3:
        raise InputError(f"{len(uniq)} labelled patients cannot be split into train, validation and test; label more studies")
    strata = _strata(patients, labels.values[rows], labels.task)
    ids = np.arange(len(uniq))
    rest, test = _split(ids, strata, test_fraction, seed)
    train, val = _split(rest, strata[rest], val_fraction / (1 - test_fraction), seed + 1)
    member = [np.isin(inv, part) for part in (train, val, test)]
    return tuple(rows[m] for m in member)


def sample_fraction(bags: Bags, labels: LabelSet, train: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified share of the training patients (at least two), all their studies."""
    if fraction >= 1:
        return train
    patients = bags.patient_keys[train]
    uniq, inv = np.unique(patients, return_inverse=True)
    keep_n = max(2, round(fraction * len(uniq)))
    if keep_n >= len(uniq):
        return train
    strata = _strata(patients, labels.values[train], labels.task)
    kept, _ = _split(np.arange(len(uniq)), strata, len(uniq) - keep_n, seed)
    return train[np.isin(inv, kept)]
