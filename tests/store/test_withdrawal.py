"""Withdrawal of a study or a patient everywhere: every table, the indexes, old versions on
disk, the journal that finishes an interrupted one."""

from __future__ import annotations

import subprocess
import threading
import time

import numpy as np
import pytest
from store_data import MODEL, copy_store, study_rows

from cmr_search.core.exceptions import InputError
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore, StoreConfig
from cmr_search.store.search import Searcher
from cmr_search.store.sources import Sources
from cmr_search.store.withdrawal import finish_pending_withdrawals, withdraw


def _grep(root, text: str) -> list[str]:
    out = subprocess.run(["grep", "-rl", "--binary-files=text", text, str(root)], capture_output=True, text=True, check=False)
    return out.stdout.split()


def test_withdraw_a_study_removes_it_everywhere_and_from_disk(emb_store, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("study_uid,lvef\n1.2.826.0.1.299,55\n1.2.826.0.1.298,40\n")
    emb_store.clip_store.import_labels(labels)
    searcher = Searcher(emb_store.root)
    uid = "1.2.826.0.1.299"  # no other uid has it as a prefix, so grep finds only this study
    target = np.asarray(emb_store.get_study(uid, MODEL)["vector"], np.float32)
    assert searcher.by_vector(target, 1)[0].study_uid == uid
    assert _grep(emb_store.root, uid)

    report = withdraw(emb_store, study_uids=[uid])
    assert report.rows_deleted["studies"] == 1 and report.rows_deleted["views"] == 6 and report.rows_deleted["labels"] == 1
    assert emb_store.get_study(uid, MODEL) is None and emb_store.count("views", MODEL) == 1794
    assert all(h.study_uid != uid for h in searcher.by_vector(target, 20))
    assert _grep(emb_store.root, uid) == []  # no old version, index generation or journal keeps it
    assert not list((emb_store.root / "journal").glob("*"))


def test_withdraw_a_patient_removes_all_their_studies(emb_store):
    key = emb_store.get_study("1.2.826.0.1.6", MODEL)["patient_key"]  # patient pk3 has studies 6 and 7
    report = withdraw(emb_store, patient_keys=[key])
    assert sorted(report.study_uids) == ["1.2.826.0.1.6", "1.2.826.0.1.7"]
    assert emb_store.rows("studies", MODEL, ["study_uid"], where=f"patient_key = '{key}'").num_rows == 0
    assert emb_store.count("studies", MODEL) == 298


def test_withdraw_nothing_is_a_clear_error(emb_store):
    with pytest.raises(InputError, match="nothing to withdraw"):
        withdraw(emb_store, study_uids=["9.9.9"])


def test_an_interrupted_withdrawal_is_finished_on_open(emb_store):
    journal = emb_store.root / "journal"
    journal.mkdir(exist_ok=True)
    (journal / "withdraw-abc.json").write_text('{"study_uids": ["1.2.826.0.1.9"], "purge": false}')
    reopened = Searcher(emb_store.root).store  # the next search (or write, or `cmr delete`) finishes it
    assert reopened.get_study("1.2.826.0.1.9", MODEL) is None
    assert not (journal / "withdraw-abc.json").exists()


def test_withdraw_from_an_ingested_store_removes_clips_reports_and_labels(ingested, tmp_path):

    src, _ = ingested
    root = tmp_path / "store"
    copy_store(src.root, root)
    store = EmbeddingStore.open(root)
    clips = store.clip_store
    uid = min(clips.study_uids())
    n_clips = clips.count_clips(f"study_uid = '{uid}'")
    assert n_clips and uid in clips.table_study_uids("reports") and uid in clips.table_study_uids("labels")
    assert Sources(clips).of(uid)["kind"] == "files"
    report = withdraw(store, study_uids=[uid])
    assert report.rows_deleted["clips"] == n_clips and report.rows_deleted["reports"] == 1
    assert report.rows_deleted["sources"] == 1 and Sources(clips).of(uid) is None
    assert uid not in clips.study_uids() and uid not in clips.table_study_uids("reports")
    assert uid not in clips.table_study_uids("labels") and uid not in clips.table_study_uids("sources")
    assert _grep(root, uid) == []


def test_the_key_gets_a_btree_once_large_and_survives_a_purge(tmp_path):
    store = EmbeddingStore(ClipStore.open(tmp_path / "s", create=True), config=StoreConfig(key_index_rows=50))
    store.upsert_studies(study_rows(60))
    assert [ix.columns for ix in store.studies.list_indices()] == [["study_uid"]]
    store.upsert_studies(study_rows(60, seed=5))  # replaced through the index
    assert store.count("studies") == 60
    withdraw(store, study_uids=["1.2.826.0.1.3"])
    assert [ix.columns for ix in store.studies.list_indices()] == [["study_uid"]] and store.count("studies") == 59


def test_a_journal_never_completed_is_dropped_and_nothing_withdrawn(emb_store):
    journal = emb_store.root / "journal"
    journal.mkdir(exist_ok=True)
    (journal / "withdraw-abc.tmp").write_text('{"study_uids": ["1.2.826.0.1.9"], "purge": false}')
    assert finish_pending_withdrawals(emb_store) == []
    assert emb_store.get_study("1.2.826.0.1.9", MODEL) is not None and not list(journal.glob("*"))


def test_a_pending_withdrawal_waits_for_the_study_write_lock(emb_store):
    """A journal seen while its withdrawal still runs (the lock held) is not done twice at once."""
    journal = emb_store.root / "journal"
    journal.mkdir(exist_ok=True)
    (journal / "withdraw-abc.json").write_text('{"study_uids": ["1.2.826.0.1.9"], "purge": false}')
    done = []
    with emb_store.write_lock():  # as a withdrawal running in another process holds it
        worker = threading.Thread(target=lambda: done.extend(finish_pending_withdrawals(EmbeddingStore.open(emb_store.root))))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and emb_store.get_study("1.2.826.0.1.9", MODEL) is not None
    worker.join(60)
    assert [r.study_uids for r in done] == [["1.2.826.0.1.9"]] and emb_store.get_study("1.2.826.0.1.9", MODEL) is None
    assert not list(journal.glob("*"))
