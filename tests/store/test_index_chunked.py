"""Index builds a batch at a time (issue 27, item 3): the same index as a build from memory,
read in as many batches as the batch size calls for, never the whole table at once."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
from store_data import MODEL, clustered, make_store, study_rows

from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.index import VectorIndex
from cmr_search.store.index import sync as sync_module
from cmr_search.store.index.build import build_from, build_index, train_positions
from cmr_search.store.index.sync import TableSnapshot, TableSource

IVF = IndexConfig(exact_below=200, nlist=16, nprobe=4)
FLAT = IndexConfig(exact_below=10_000)
N = 1500


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> EmbeddingStore:
    """1,500 studies of MODEL in two commits, and 200 of another model the builds must skip."""
    store = make_store(tmp_path_factory.mktemp("chunked") / "s", n=1000, views=False)
    store.upsert_studies(study_rows(N - 1000, seed=1, start=1000))
    store.upsert_studies(study_rows(200, seed=2, model_id="other"))
    return store


def _snapshot(store: EmbeddingStore) -> tuple[TableSnapshot, np.ndarray]:
    snapshot = TableSnapshot(store, "studies", MODEL)
    snapshot.pin()
    return snapshot, snapshot.keys()[0]


def _in_memory(store: EmbeddingStore, config: IndexConfig):
    rows = store.rows("studies", MODEL, ["vec_id", "vector"]).sort_by("vec_id")  # as a rebuild read it before
    return build_index(EmbeddingStore.vectors(rows), rows["vec_id"].to_numpy(), 512, config, None)


class CountingSource(TableSource):
    """A TableSource that records the size of every batch it yields and every read from Lance."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.taken = [], []
        take = self.snapshot.take

        def counted(row_ids, columns):
            self.taken.append(len(row_ids))
            return take(row_ids, columns)

        self.snapshot.take = counted

    def batches(self):
        for vectors, ids in super().batches():
            self.seen.append(len(ids))
            yield vectors, ids


@pytest.mark.parametrize("config", [IVF, FLAT], ids=["ivf", "flat"])
def test_batches_build_the_index_a_build_from_memory_does(store, config):
    snapshot, ids = _snapshot(store)
    chunked = build_from(TableSource(snapshot, ids, batch_size=128), 512, config, None)
    whole = _in_memory(store, config)
    assert chunked.kind == whole.kind and chunked.index.ntotal == whole.index.ntotal == N
    if chunked.kind == "ivf":  # trained on the same sample in the same order: the same centroids
        centroids = [faiss.extract_index_ivf(b.index).quantizer.reconstruct_n(0, 16) for b in (chunked, whole)]
        assert np.array_equal(*centroids)
    queries = clustered(40, seed=11)
    d_chunked, i_chunked = chunked.index.search(queries, 10)
    d_whole, i_whole = whole.index.search(queries, 10)
    assert np.array_equal(i_chunked, i_whole) and np.allclose(d_chunked, d_whole, atol=1e-6)
    assert np.array_equal(chunked.index.reconstruct(int(ids[7])), whole.index.reconstruct(int(ids[7])))


def test_a_table_larger_than_a_batch_is_read_in_batches(store):
    snapshot, ids = _snapshot(store)
    source = CountingSource(snapshot, ids, batch_size=100)
    built = build_from(source, 512, IVF, None)
    assert max(source.seen) <= 100 and sum(source.seen) == N  # never more than a batch at once, each row once
    assert len(source.seen) == math.ceil(N / 100) == built.stats.chunks
    sample = len(train_positions(N, IVF)[1])
    assert sample == 16 * 40 and max(source.taken) <= 100 and sum(source.taken) == sample + N  # Lance reads, too
    assert built.stats.index_bytes == N * (512 * 4 + 8) + 16 * 512 * 4
    assert built.stats.rss_peak >= built.stats.rss_before > 0 and built.stats.seconds > 0


def test_sync_rebuilds_a_batch_at_a_time_and_reports_memory(store, tmp_path, monkeypatch):
    monkeypatch.setattr(sync_module, "BUILD_BATCH", 500)
    index = VectorIndex(store, "studies", MODEL, IVF)  # a fresh index: its first sync rebuilds
    report = index.sync(save=False)
    assert report.action == "rebuilt" and report.build.chunks >= 3 and report.build.index_bytes > N * 2048
    assert index.kind == "ivf" and len(index) == N and index.meta.num_rows == N
    assert set(index.meta["vec_id"].to_pylist()) == set(index.ids) and set(index.meta["model_id"].to_pylist()) == {MODEL}
    queries = clustered(20, seed=12)
    _, got = index.search(queries, 10)
    assert np.array_equal(got, _in_memory(store, IVF).index.search(queries, 10)[1])


def test_torch_exact_index_filled_in_batches_equals_one_add():
    from cmr_search.store.index.torch_exact import TorchExactIndex

    vectors, ids = clustered(300, seed=13), np.arange(300, dtype=np.int64) * 7
    once, batched = TorchExactIndex(512, "cpu"), TorchExactIndex(512, "cpu")
    once.add_with_ids(vectors, ids)
    batched.reserve(300)
    room = batched._room
    for lo in range(0, 300, 64):
        batched.add_with_ids(vectors[lo : lo + 64], ids[lo : lo + 64])
    assert batched._room is room and batched.vectors.data_ptr() == room.data_ptr()  # filled in place
    queries = clustered(5, seed=14)
    assert np.array_equal(once.search(queries, 10)[1], batched.search(queries, 10)[1])
    batched.add_with_ids(vectors[:1], np.array([9999]))  # past the room: grows as before
    batched.remove_ids(ids[:3])
    assert batched.ntotal == 298 and np.array_equal(batched.vector(9999), vectors[0])
