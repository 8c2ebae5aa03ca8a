"""A store holding synthetic view and study embeddings with a known signal, and labels."""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv

from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.synth.embeddings import EmbeddingCohort, embedding_cohort

MODEL = "m-heads"


def write_cohort(store: EmbeddingStore, cohort: EmbeddingCohort, model_id: str = MODEL) -> None:
    """Upsert the cohort's views and studies as embeddings of ``model_id``."""
    views, studies = [], []
    for i, uid in enumerate(cohort.study_uids):
        pk = cohort.patient_keys[i]
        for j, name in enumerate(cohort.view_names[i]):
            views.append({"clip_id": name["clip_id"], "study_uid": uid, "patient_key": pk, "view": name["view"],
                          "slice_index": name["slice_index"], "model_id": model_id,
                          "vector": cohort.views[i, j].tolist()})
        studies.append({"study_uid": uid, "patient_key": pk, "model_id": model_id,
                        "vector": cohort.studies[i].tolist(), "n_views": len(cohort.view_names[i]),
                        "clip_ids": [v["clip_id"] for v in cohort.view_names[i]]})
    store.upsert_views(views)
    store.upsert_studies(studies)


def make_head_store(root: Path, n: int = 400, seed: int = 0, labels: bool = True) -> tuple[EmbeddingStore, EmbeddingCohort]:
    """A store with ``n`` synthetic studies; their labels imported unless ``labels`` is False."""
    cohort = embedding_cohort(n, seed=seed, dim=512, min_views=4, max_views=10)
    store = EmbeddingStore(ClipStore.open(root, create=True))
    write_cohort(store, cohort)
    if labels:
        path = root.parent / f"labels-{seed}.csv"
        pacsv.write_csv(cohort.labels, path)
        store.clip_store.import_labels(path)
    return store, cohort
