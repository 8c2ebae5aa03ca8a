"""One writer discipline: every commit of study rows holds the store's write lock and keeps
only what is derived from rows still stored as they were read, and withdrawn studies stay
withdrawn. Each race is made deterministic by pausing a writer at its commit seam
(``before_commit``) while the other writer runs, then letting it go: no sleeps."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from store_data import copy_store

from cmr_search.core.exceptions import StoreError, WithdrawnError
from cmr_search.core.layout import StoreLayout
from cmr_search.encoder.embed import embed_store
from cmr_search.evals.baseline import random_baseline
from cmr_search.ingest import IngestConfig, ingest
from cmr_search.store.clip_store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.index.files import IndexFiles
from cmr_search.store.patients import patient_salt
from cmr_search.store.search import Searcher
from cmr_search.store.withdrawal import readmit, withdraw


class Pause:
    """A ``before_commit`` hook that stops the writer at one commit until released."""

    def __init__(self, at: str):
        self.at, self.reached, self.release = at, threading.Event(), threading.Event()

    def __call__(self, what: str) -> None:
        if what == self.at and not self.reached.is_set():
            self.reached.set()
            assert self.release.wait(300), "the test never released the writer"


def run_paused(target, pause: Pause, meanwhile) -> object:
    """Run ``target`` on a thread until it reaches the pause, do ``meanwhile``, let it finish."""
    out: dict = {}

    def work():
        try:
            out["result"] = target()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            out["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    try:
        assert pause.reached.wait(300), f"the writer never reached its {pause.at} commit: {out.get('error')!r}"
        meanwhile()
    finally:
        pause.release.set()
        thread.join(300)
    if "error" in out:
        raise out["error"]
    return out["result"]


def rows_of(store: EmbeddingStore, table: str, uid: str, model_id: str | None = None) -> list[dict]:
    where = f"study_uid = '{uid}'" + (f" AND model_id = '{model_id}'" if model_id else "")
    if not store.has(table):
        return []
    return store.clip_store.db.open_table(table).search().where(where).limit(None).to_arrow().to_pylist()


@pytest.fixture()
def store_copy(trained_store, tmp_path) -> tuple[Path, str, Path]:
    """A private copy of the test store and a second encoder (random init) none of its clips
    are embedded with yet: (root, trained model_id, the new encoder's folder)."""
    root = tmp_path / "store"
    copy_store(trained_store[0], root)
    return root, trained_store[1], random_baseline(root, trained_store[1], seed=11)


def _two_studies(root: Path) -> tuple[str, str]:
    uids = sorted(set(ClipStore.open(root).clips.to_arrow()["study_uid"].to_pylist()))
    return uids[0], uids[1]


@pytest.mark.parametrize("at", ["views", "studies"])
def test_a_study_withdrawn_while_embed_waits_to_commit_gets_no_embedding(store_copy, at):
    root, _, encoder = store_copy
    victim, other = _two_studies(root)
    pause = Pause(at)
    report = run_paused(lambda: embed_store(root, encoder, progress=False, before_commit=pause), pause,
                        lambda: withdraw(EmbeddingStore.open(root), study_uids=[victim]))
    store = EmbeddingStore.open(root)
    for table in ("clips", "views", "studies"):
        assert rows_of(store, table, victim) == [], f"the withdrawn study came back in {table}"
    assert rows_of(store, "studies", other, report.model_id)  # the rest was embedded
    hits = Searcher(root, report.model_id).by_study(other, k=50)
    assert victim not in {h.study_uid for h in hits}


def test_a_study_replaced_while_embed_waits_keeps_only_its_new_embeddings(store_copy):
    root, trained_id, encoder = store_copy
    uid, _ = _two_studies(root)
    store = EmbeddingStore.open(root)
    clips = sorted(rows_of(store, "clips", uid), key=lambda r: r["clip_id"])[:3]
    views = [v for v in rows_of(store, "views", uid, trained_id) if v["clip_id"] in {c["clip_id"] for c in clips}]
    (study,) = rows_of(store, "studies", uid, trained_id)
    now = datetime.now(UTC)  # new pixels: an upload stamps its clips anew
    new_clips = [c | {"ingested_at": now} for c in clips]
    new_views = [{k: v for k, v in row.items() if k not in ("vec_id", "rev", "embedded_at")} for row in views]
    new_study = {k: v for k, v in study.items() if k not in ("vec_id", "rev", "embedded_at")} | {
        "clip_ids": [v["clip_id"] for v in views], "attention": [1 / len(views)] * len(views), "n_views": len(views)}

    pause = Pause("views")
    report = run_paused(lambda: embed_store(root, encoder, progress=False, before_commit=pause), pause,
                        lambda: EmbeddingStore.open(root).put_study(new_clips, new_views, new_study))
    store = EmbeddingStore.open(root)
    assert {c["clip_id"] for c in rows_of(store, "clips", uid)} == {c["clip_id"] for c in clips}
    assert {v["model_id"] for v in rows_of(store, "views", uid)} == {trained_id}  # no view of the old pixels
    assert rows_of(store, "studies", uid, report.model_id) == []  # nor a study pooled from them
    (kept,) = rows_of(store, "studies", uid, trained_id)
    assert kept["clip_ids"] == new_study["clip_ids"]


def test_an_ingest_that_read_a_study_before_its_withdrawal_does_not_store_it_again(cohort, tmp_path):
    root = tmp_path / "store"
    store = ClipStore.open(root, create=True)
    salt = b"test-salt"
    ingest([cohort / "dicom"], store, IngestConfig(workers=1), salt, progress=False)
    victim, _ = _two_studies(root)
    pause = Pause("clips")
    report = run_paused(
        lambda: ingest([cohort / "dicom"], ClipStore.open(root), IngestConfig(workers=1), salt,
                       labels=cohort / "labels.csv", progress=False, before_commit=pause),
        pause, lambda: withdraw(EmbeddingStore.open(root), study_uids=[victim]))
    store = ClipStore.open(root)
    assert victim not in store.study_uids() and victim not in store.table_study_uids("labels")
    assert any(s["study_uid"] == victim and "withdrawn" in s["reason"] for s in report.skipped)
    again = ingest([cohort / "dicom"], store, IngestConfig(workers=1), salt, progress=False)
    assert victim not in store.study_uids() and again.studies_written == len(store.study_uids())

    assert readmit(EmbeddingStore.open(root), study_uids=[victim]) == 1  # the operator's decision
    ingest([cohort / "dicom"], store, IngestConfig(workers=1), salt, progress=False)
    assert victim in store.study_uids()


def test_an_upload_of_a_withdrawn_study_or_patient_is_refused(store_copy):
    root, model_id, _ = store_copy
    uid, other = _two_studies(root)
    store = EmbeddingStore.open(root)
    clips, views = rows_of(store, "clips", other), rows_of(store, "views", other, model_id)
    (study,) = rows_of(store, "studies", other, model_id)
    withdraw(store, patient_keys=[study["patient_key"]])
    with pytest.raises(WithdrawnError, match="readmit"):
        store.put_study(clips, views, study)
    assert rows_of(store, "clips", other) == []
    assert rows_of(store, "clips", uid)  # other patients untouched


def _salt_after_barrier(root: str, barrier) -> bytes:
    barrier.wait()
    return patient_salt(root)


def test_processes_opening_a_fresh_store_at_once_share_one_whole_salt(tmp_path):
    ctx = mp.get_context("spawn")
    n = 8
    with ctx.Manager() as manager, ctx.Pool(n) as pool:
        for trial in range(15):
            root = tmp_path / f"store-{trial}"
            barrier = manager.Barrier(n)
            salts = pool.starmap(_salt_after_barrier, [(str(root), barrier)] * n)
            assert len(set(salts)) == 1 and len(salts[0]) == 64, salts
            assert StoreLayout(root).patient_salt.read_text().encode() == salts[0]
            assert sorted(p.name for p in StoreLayout(root).patient_salt.parent.iterdir()) == ["patient_salt"]


def test_an_empty_salt_is_refused_not_used(tmp_path):
    path = StoreLayout(tmp_path).patient_salt
    path.parent.mkdir(parents=True)
    path.write_text("")
    with pytest.raises(StoreError, match="is empty"):
        patient_salt(tmp_path)


def test_an_index_generation_older_than_the_current_one_is_never_switched_to(tmp_path):
    files = IndexFiles(tmp_path / "index")
    ids = np.arange(3, dtype=np.int64)
    newer = files.write(np.zeros(8, np.uint8), ids, ids, {"version": 12, "dim": 4})
    older = files.write(np.zeros(8, np.uint8), ids, ids, {"version": 9, "dim": 4})  # a slow background save
    assert older == newer and files.pointer.read_text() == newer
    assert sorted(p.name for p in files.folder.iterdir() if not p.name.startswith(".")) == ["CURRENT", newer]
    assert json.loads((files.folder / newer / "meta.json").read_text())["version"] == 12


def test_tombstones_keep_hashes_and_readmit_a_patient_with_their_studies(tmp_path):
    from cmr_search.store.tombstones import Tombstones

    stones = Tombstones(tmp_path)
    stones.add(["1.2.3", "1.2.4"], {"1.2.4": "pk-9"})  # 1.2.4 left with its patient
    assert stones.withdrawn(["1.2.3", "1.2.4", "1.2.5"]) == {"1.2.3", "1.2.4"}
    assert stones.withdrawn(["1.2.6"], {"1.2.6": "pk-9"}) == {"1.2.6"}  # the patient's later study
    assert "1.2.3" not in stones.path.read_text() and "pk-9" not in stones.path.read_text()
    assert stones.remove(patient_keys=["pk-9"]) == 2  # the patient and the study withdrawn with them
    assert stones.withdrawn(["1.2.3", "1.2.4", "1.2.6"], {"1.2.6": "pk-9"}) == {"1.2.3"}


def test_embed_reads_the_clips_again_when_a_withdrawal_purges_its_pinned_version(store_copy):
    root, _, encoder = store_copy
    victim, _ = _two_studies(root)
    pause = Pause("views")  # the first commit, after the first 8 clips: most are still to read
    report = run_paused(lambda: embed_store(root, encoder, batch_size=8, commit_every=8, progress=False,
                                            before_commit=pause),
                        pause, lambda: withdraw(EmbeddingStore.open(root), study_uids=[victim], purge=True))
    store = EmbeddingStore.open(root)
    clips = set(store.clip_store.clip_metadata(["clip_id"])["clip_id"].to_pylist())
    assert store.embedded_clip_ids(report.model_id) == clips  # every remaining clip, none of the victim's
    assert rows_of(store, "views", victim) == []
