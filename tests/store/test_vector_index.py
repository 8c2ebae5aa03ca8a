"""The FAISS index: exact and IVF recall, persistence with its Lance version, stale-index
repair by delta, filtered completeness, concurrency."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from store_data import MODEL, clustered, exact_top, make_store, study_rows

from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore, vec_id
from cmr_search.store.filters import FilterFrame
from cmr_search.store.index import VectorIndex
from cmr_search.store.index.build import build_index
from cmr_search.store.index.torch_exact import TorchExactIndex

IVF = IndexConfig(exact_below=200, nlist=16, nprobe=4)


def _table_vectors(store: EmbeddingStore, table: str = "studies"):
    rows = store.rows(table, MODEL, ["vec_id", "vector"])
    return EmbeddingStore.vectors(rows), rows["vec_id"].to_numpy()


def test_flat_index_is_exact(emb_store):
    index = VectorIndex.open(emb_store, "studies", MODEL)
    assert index.kind == "flat" and len(index) == 300
    vectors, ids = _table_vectors(emb_store)
    queries = clustered(20, seed=9)
    _, got = index.search(queries, 10)
    for q, row in zip(queries, got):
        assert list(row) == list(exact_top(vectors, ids, q, 10))


def test_ivf_recall_against_exact(tmp_path):
    store = make_store(tmp_path / "s", n=2000, views=False)
    index = VectorIndex.open(store, "studies", MODEL, IVF)
    assert index.kind == "ivf" and index.nlist == 16
    vectors, ids = _table_vectors(store)
    queries = clustered(50, seed=3)
    _, got = index.search(queries, 10)
    recall = np.mean([len(set(g) & set(exact_top(vectors, ids, q, 10))) / 10 for q, g in zip(queries, got)])
    assert recall >= 0.95


def test_ivf_lists_are_found_through_an_hnsw_graph_or_a_flat_scan(tmp_path):
    import faiss

    store = make_store(tmp_path / "s", n=400, views=False)
    index = VectorIndex.open(store, "studies", MODEL, IndexConfig(exact_below=200, nlist=16, quantizer_ef=24))
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index.index).quantizer)
    assert isinstance(quantizer, faiss.IndexHNSWFlat) and quantizer.ntotal == 16
    reloaded = VectorIndex.open(store, "studies", MODEL, IndexConfig(exact_below=200, quantizer_ef=48), sync=False)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(reloaded.index).quantizer)
    assert quantizer.hnsw.efSearch == 48  # search depth comes from the config, not the file
    built = build_index(*_table_vectors(store), 512, IndexConfig(exact_below=200, nlist=16, quantizer="flat"), None).index
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(built).quantizer), faiss.IndexFlat)


def test_index_is_persisted_with_its_version_and_reused(emb_store):
    first = VectorIndex.open(emb_store, "studies", MODEL)
    assert first.version == emb_store.version("studies")
    again = VectorIndex.open(emb_store, "studies", MODEL, sync=False)
    assert again.version == first.version and len(again) == 300  # loaded from disk
    assert again.sync().action == "current"


def test_stale_index_is_detected_and_repaired_by_delta(emb_store):
    VectorIndex.open(emb_store, "studies", MODEL)  # persisted at the current version
    new = study_rows(5, seed=7, start=1000)
    emb_store.upsert_studies(new)  # another writer moves the table on
    changed = emb_store.get_study("1.2.826.0.1.3", MODEL)
    flipped = (-np.asarray(changed["vector"])).tolist()
    emb_store.upsert_studies([{k: v for k, v in changed.items() if k not in ("vec_id", "rev", "embedded_at")} | {"vector": flipped}])
    emb_store.studies.delete("study_uid = '1.2.826.0.1.4'")

    stale = VectorIndex.open(emb_store, "studies", MODEL, sync=False)
    assert not stale.is_current()
    report = stale.sync()
    assert (report.action, report.added, report.updated, report.removed) == ("delta", 5, 1, 1)
    assert stale.version == emb_store.version("studies") and len(stale) == 304
    _, hit = stale.search(np.asarray(new[0]["vector"], np.float32), 1)
    assert hit[0, 0] == vec_id(new[0]["study_uid"])
    _, hit = stale.search(np.asarray(flipped, np.float32), 1)
    assert hit[0, 0] == vec_id("1.2.826.0.1.3")  # the replaced vector, not the old one
    _, hits = stale.search(clustered(30, seed=5), 300)
    assert vec_id("1.2.826.0.1.4") not in hits
    _vectors, ids = _table_vectors(emb_store)
    assert set(stale.ids) == set(ids)


def test_a_large_difference_rebuilds_and_size_switches_to_ivf(tmp_path):
    store = make_store(tmp_path / "s", n=150, views=False)
    cfg = IndexConfig(exact_below=200, nlist=8, nprobe=8)
    assert VectorIndex.open(store, "studies", MODEL, cfg).kind == "flat"
    store.upsert_studies(study_rows(100, seed=4, start=500))
    index = VectorIndex.open(store, "studies", MODEL, cfg)
    assert index.kind == "ivf" and len(index) == 250


def test_damaged_index_files_are_rebuilt(emb_store):
    index = VectorIndex.open(emb_store, "studies", MODEL)
    gen = index.folder / (index.folder / "CURRENT").read_text().strip()
    (gen / "index.faiss").write_bytes(b"not an index")
    again = VectorIndex.open(emb_store, "studies", MODEL)
    assert len(again) == 300 and again.version == emb_store.version("studies")


def test_selective_filter_still_returns_k_exact_neighbours(tmp_path):
    store = make_store(tmp_path / "s", n=2000, views=False)
    index = VectorIndex.open(store, "studies", MODEL, IndexConfig(exact_below=200, nlist=32, nprobe=1))
    allowed = FilterFrame(index.meta).ids("site = 'B' AND age < 30")  # 1 in 10 sites, 1 in 6 ages
    assert 10 < len(allowed) < 100
    vectors, ids = _table_vectors(store)
    mask = np.isin(ids, allowed)
    for q in clustered(10, seed=8):
        _, got = index.search(q, 10, allowed)
        assert (got[0] >= 0).sum() == 10 and np.isin(got[0], allowed).all()
        assert set(got[0]) == set(exact_top(vectors[mask], ids[mask], q, 10))


def test_filter_with_fewer_matches_than_k_returns_all_of_them(emb_store):
    index = VectorIndex.open(emb_store, "studies", MODEL)
    allowed = FilterFrame(index.meta).ids("age = 20")  # 5 studies
    _, got = index.search(clustered(1, seed=2), 10, allowed)
    assert sorted(got[0][got[0] >= 0]) == sorted(allowed) and (got[0] == -1).sum() == 10 - len(allowed)


def test_searches_run_concurrently_with_syncs(tmp_path):
    store = make_store(tmp_path / "s", n=400, views=False)
    index = VectorIndex.open(store, "studies", MODEL)
    errors: list[BaseException] = []
    stop = threading.Event()

    def search():
        queries = clustered(8, seed=1)
        while not stop.is_set():
            try:
                d, i = index.search(queries, 5)
                assert (i >= 0).all() and np.all(np.diff(d, axis=1) <= 1e-6)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
                return

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    for step in range(6):
        store.upsert_studies(study_rows(20, seed=10 + step, start=5000 + 20 * step))
        index.sync()
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 520 and index.is_current()


def test_torch_exact_path_matches_faiss(emb_store):
    index = VectorIndex.open(emb_store, "studies", MODEL)
    vectors, ids = _table_vectors(emb_store)
    torch_index = TorchExactIndex(512, "cpu")
    torch_index.add_with_ids(vectors, ids)
    queries = clustered(5, seed=4)
    allowed = FilterFrame(index.meta).ids("sex = 'F'")
    for sel in (None, allowed):
        d_t, i_t = torch_index.search(queries, 7, sel)
        d_f, i_f = index.search(queries, 7, sel)
        assert (i_t == i_f).all() and np.allclose(d_t, d_f, atol=1e-5)
    torch_index.remove_ids(ids[:10])
    assert torch_index.ntotal == 290


def test_empty_table_gives_empty_results(tmp_path):
    store = make_store(tmp_path / "s", n=0, views=False)
    index = VectorIndex.open(store, "studies", MODEL)
    _d, i = index.search(clustered(1), 3)
    assert (i == -1).all()


@pytest.mark.parametrize("table", ["views", "studies"])
def test_views_and_studies_have_their_own_index(emb_store, table):
    index = VectorIndex.open(emb_store, table, MODEL)
    assert len(index) == (1800 if table == "views" else 300)
    assert (emb_store.root / "indexes" / table / MODEL / "CURRENT").exists()


def test_every_commit_is_seen_even_right_after_a_check(emb_store):
    index = VectorIndex.open(emb_store, "studies", MODEL)
    for step in range(15):
        assert index.is_current()
        emb_store.upsert_studies(study_rows(1, seed=step, start=7000 + step))  # within the same clock tick
        assert not index.is_current()
        index.sync()
    assert len(index) == 315


@pytest.mark.parametrize("cfg", [IndexConfig(), IVF], ids=["flat", "ivf"])
def test_vector_by_id_follows_upserts_and_deletes(tmp_path, cfg):
    store = make_store(tmp_path / "s", n=300, views=False)
    index = VectorIndex.open(store, "studies", MODEL, cfg)
    row = store.get_study("1.2.826.0.1.3", MODEL)
    assert np.allclose(index.vector(vec_id("1.2.826.0.1.3")), row["vector"], atol=1e-6)
    flipped = (-np.asarray(row["vector"])).tolist()
    store.upsert_studies([{k: v for k, v in row.items() if k not in ("vec_id", "rev", "embedded_at")} | {"vector": flipped}])
    store.studies.delete("study_uid = '1.2.826.0.1.4'")
    index.sync()
    assert np.allclose(index.vector(vec_id("1.2.826.0.1.3")), flipped, atol=1e-6)
    assert index.vector(vec_id("1.2.826.0.1.4")) is None
    reloaded = VectorIndex.open(store, "studies", MODEL, cfg, sync=False)
    assert np.allclose(reloaded.vector(vec_id("1.2.826.0.1.3")), flipped, atol=1e-6)
