"""Search over the store: scan-to-scan excludes the query, view-level filters, label
filters, clear errors, and the `cmr search` / `cmr delete` commands."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from store_data import MODEL, clustered

from cmr_search.core.exceptions import InputError, StoreError
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.search import Searcher

CMR = [sys.executable, "-m", "cmr_search.cli"]


def _exact_studies(store: EmbeddingStore, query: np.ndarray, where: str | None = None) -> list[str]:
    rows = store.rows("studies", MODEL, ["study_uid", "vector"], where)
    order = np.argsort(-(EmbeddingStore.vectors(rows) @ query), kind="stable")
    return [rows["study_uid"][int(i)].as_py() for i in order]


def test_by_study_returns_the_k_nearest_other_studies(emb_store):
    searcher = Searcher(emb_store.root)
    uid = "1.2.826.0.1.42"
    hits = searcher.by_study(uid, k=8)
    query = np.asarray(emb_store.get_study(uid, MODEL)["vector"], np.float32)
    assert [h.study_uid for h in hits] == [u for u in _exact_studies(emb_store, query) if u != uid][:8]
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    assert "patient_key" not in json.dumps([h.to_dict() for h in hits])


def test_by_study_can_leave_out_the_same_patient(emb_store):
    searcher = Searcher(emb_store.root)
    # studies 6 and 7 belong to one patient; make 7 the nearest neighbour of 6
    row = emb_store.get_study("1.2.826.0.1.6", MODEL)
    twin = emb_store.get_study("1.2.826.0.1.7", MODEL)
    emb_store.upsert_studies([{k: v for k, v in twin.items() if k not in ("vec_id", "rev", "embedded_at")} | {"vector": row["vector"]}])
    assert searcher.by_study("1.2.826.0.1.6", k=1)[0].study_uid == "1.2.826.0.1.7"  # the index caught up
    others = searcher.by_study("1.2.826.0.1.6", k=5, exclude_same_patient=True)
    assert "1.2.826.0.1.7" not in [h.study_uid for h in others] and len(others) == 5


def test_text_queries_go_through_the_callers_encoder(emb_store):
    asked = []

    def encode(model_id: str, texts: list[str]) -> np.ndarray:
        asked.append((model_id, texts))
        return clustered(len(texts), seed=5)

    with pytest.raises(InputError, match="without a text encoder"):
        Searcher(emb_store.root).by_text("apical thrombus")
    hits = Searcher(emb_store.root, encode_text=encode).by_text("apical thrombus", k=4)
    assert asked == [(MODEL, ["apical thrombus"])]
    assert [h.study_uid for h in hits] == _exact_studies(emb_store, clustered(1, seed=5)[0])[:4]


def test_metadata_filter_at_study_level(emb_store):
    searcher = Searcher(emb_store.root)
    query = clustered(1, seed=3)[0]
    hits = searcher.by_vector(query, k=10, where="sex = 'F' AND age BETWEEN 30 AND 50")
    assert len(hits) == 10 and all(h.metadata["sex"] == "F" and 30 <= h.metadata["age"] <= 50 for h in hits)
    assert [h.study_uid for h in hits] == _exact_studies(emb_store, query, "sex = 'F' AND age >= 30 AND age <= 50")[:10]


def test_view_filter_searches_views_and_returns_each_study_once(emb_store):
    searcher = Searcher(emb_store.root)
    assert searcher.level_for("view = 'SAX'") == "views" and searcher.level_for("site = 'view'") == "studies"
    hits = searcher.by_vector(clustered(1, seed=4)[0], k=12, where="view = 'SAX' AND slice_index >= 0")
    assert len(hits) == 12 and len({h.study_uid for h in hits}) == 12
    assert all(h.view == "SAX" and h.slice_index >= 0 and h.clip_id.startswith(h.study_uid) for h in hits)


def test_label_columns_filter(emb_store, tmp_path):
    labels = tmp_path / "labels.csv"
    lines = ["study_uid,lvef,sex"] + [f"1.2.826.0.1.{i},{25 if i % 4 == 0 else 60},X" for i in range(300)]
    labels.write_text("\n".join(lines) + "\n")
    emb_store.clip_store.import_labels(labels)
    searcher = Searcher(emb_store.root)
    hits = searcher.by_vector(clustered(1, seed=5)[0], k=20, where="lvef < 40 AND sex = 'M'")
    # the label file's own 'sex' column is shadowed by the DICOM one (M for even studies)
    assert len(hits) == 20 and all(int(h.study_uid.rsplit(".", 1)[1]) % 4 == 0 for h in hits)


def test_bad_filters_and_unknown_studies_are_clear_errors(emb_store):
    searcher = Searcher(emb_store.root)
    with pytest.raises(InputError, match="Columns: .*age"):
        searcher.by_vector(clustered(1)[0], where="no_such_column > 3")
    with pytest.raises(InputError, match="one SQL condition"):
        searcher.by_vector(clustered(1)[0], where="age > 3; DROP TABLE meta_rows")
    with pytest.raises(InputError):  # no reading files through the filter
        searcher.by_vector(clustered(1)[0], where="age > (SELECT count(*) FROM read_csv('/etc/passwd'))")
    with pytest.raises(InputError, match="has no embedding"):
        searcher.by_study("9.9.9")


def test_a_store_without_embeddings_says_what_to_run(tmp_path):
    ClipStore.open(tmp_path / "empty", create=True)
    with pytest.raises(StoreError, match="cmr embed"):
        Searcher(tmp_path / "empty")


def _cmr(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([*CMR, *args], capture_output=True, text=True, env=env, input=stdin, check=False)


def test_cli_search_and_delete(emb_store):
    root = str(emb_store.root)
    out = _cmr("search", "--store", root, "--study", "1.2.826.0.1.42", "-k", "5", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    uids = [h["study_uid"] for h in result["hits"]]
    assert len(uids) == 5 and "1.2.826.0.1.42" not in uids and result["model_id"] == MODEL
    assert all(isinstance(h["score"], float) for h in result["hits"])

    out = _cmr("delete", "--store", root, "--study", uids[0], "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows_deleted"]["studies"] == 1
    again = json.loads(_cmr("search", "--store", root, "--study", "1.2.826.0.1.42", "-k", "5", "--json").stdout)
    assert uids[0] not in [h["study_uid"] for h in again["hits"]] and len(again["hits"]) == 5

    out = _cmr("search", "--store", root, "--study", "1.2.826.0.1.42", "--where", "nope = 1")
    assert out.returncode == 2 and "cannot be used" in out.stderr
    out = _cmr("search", "--store", root)
    assert out.returncode == 2 and "exactly one of --text, --study or --queries" in out.stderr
    out = _cmr("search", "--store", root, "--study", "1.2.826.0.1.43", "--where", "view = 'SAX'")
    assert out.returncode == 0 and "SAX" in out.stderr


def test_cli_delete_by_raw_patient_id_never_prints_it(emb_store):
    from cmr_search.store.patients import patient_key, patient_salt

    salt = patient_salt(emb_store.root)
    key = patient_key("PAT-123", salt)
    rows = emb_store.study_rows(MODEL).to_pylist()[:2]
    emb_store.upsert_studies([{k: v for k, v in r.items() if k not in ("vec_id", "rev", "embedded_at")} | {"patient_key": key} for r in rows])
    out = _cmr("delete", "--store", str(emb_store.root), "--patient-id", "--json", stdin="PAT-123\n")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["studies"] == 2 and "PAT-123" not in out.stdout + out.stderr
    out = _cmr("delete", "--store", str(emb_store.root), "--patient", "pk-unknown")
    assert out.returncode == 2 and "nothing to withdraw" in out.stderr
    # the patient stays withdrawn (tombstoned) until an operator readmits them
    out = _cmr("delete", "--store", str(emb_store.root), "--patient-id", "--readmit", "--json", stdin="PAT-123\n")
    assert out.returncode == 0 and json.loads(out.stdout) == {"readmitted": 3}, out.stderr  # 2 studies + the patient
    assert "PAT-123" not in out.stdout + out.stderr


def test_hits_stay_correct_while_another_thread_writes(emb_store):
    import threading

    from store_data import study_rows

    searcher = Searcher(emb_store.root)
    vectors = {r["study_uid"]: np.asarray(r["vector"]) for r in emb_store.study_rows(MODEL, ["study_uid", "vector"]).to_pylist()}
    new = study_rows(60, seed=21, start=2000)
    vectors |= {r["study_uid"]: np.asarray(r["vector"]) for r in new}
    problems: list[str] = []
    done = threading.Event()

    def search():
        queries = clustered(20, seed=6)
        while not done.is_set():
            for q in queries:
                try:
                    for h in searcher.by_vector(q, 10):
                        if abs(h.score - float(q @ vectors[h.study_uid])) > 1e-4:
                            problems.append(f"{h.study_uid} scored {h.score}")
                except Exception as error:  # noqa: BLE001 - collected for the assertion
                    problems.append(repr(error))

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(0, 60, 10):
        emb_store.upsert_studies(new[i : i + 10])
        emb_store.studies.delete(f"study_uid = '1.2.826.0.1.{i}'")
    done.set()
    for t in threads:
        t.join()
    assert not problems, problems[:5]


def test_date_range_and_site_filters(emb_store):
    searcher = Searcher(emb_store.root)
    where = "study_date BETWEEN '20200301' AND '20200531' AND site = 'A'"
    hits = searcher.by_vector(clustered(1, seed=7)[0], k=15, where=where)
    assert len(hits) == 15
    assert all("20200301" <= h.metadata["study_date"] <= "20200531" and h.metadata["site"] == "A" for h in hits)


def test_warm_builds_the_hit_columns_and_names_hits_the_same(emb_store):
    cold = Searcher(emb_store.root).by_vector(clustered(1, seed=9)[0], 5)
    searcher = Searcher(emb_store.root)
    searcher.warm()
    assert searcher.index("studies")._columns.get("study_uid") is not None
    warm = searcher.by_vector(clustered(1, seed=9)[0], 5)
    assert [h.to_dict() for h in warm] == [h.to_dict() for h in cold]
