"""The embedding tables: upserts that really replace, models that never mix, compaction,
snapshot reads during writes, and study writes that take turns across processes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from lancedb.index import BTree
from store_data import MODEL, clustered, copy_store, make_store, study_rows, view_rows

from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore, StoreConfig, vec_id
from cmr_search.store.index import VectorIndex


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("vec_id", "rev", "embedded_at")}


def test_upsert_replaces_even_with_a_scalar_index_on_the_key(emb_store):
    emb_store.studies.create_index("study_uid", config=BTree())
    assert emb_store.studies.list_indices()
    rows = [_strip(emb_store.get_study(f"1.2.826.0.1.{i}", MODEL)) for i in range(10)]
    new = clustered(10, seed=99)
    inserted, updated = emb_store.upsert_studies([r | {"vector": v.tolist(), "site": "C"} for r, v in zip(rows, new)])
    assert (inserted, updated) == (0, 10)
    assert emb_store.count("studies", MODEL) == 300
    for i, v in enumerate(new):
        row = emb_store.get_study(f"1.2.826.0.1.{i}", MODEL)
        assert row["site"] == "C" and np.allclose(row["vector"], v)


def test_models_never_mix(emb_store):
    emb_store.upsert_studies(study_rows(7, model_id="other"))
    assert emb_store.model_ids() == {MODEL: 300, "other": 7}
    assert emb_store.count("studies", "other") == 7 and emb_store.count("studies", MODEL) == 300
    assert len(VectorIndex.open(emb_store, "studies", "other")) == 7
    assert emb_store.get_study("1.2.826.0.1.0", "other")["model_id"] == "other"


def test_get_count_versions(emb_store):
    row = emb_store.get_view("1.2.826.0.1.5-3", MODEL)
    assert row["view"] == "SAX" and row["vec_id"] == vec_id("1.2.826.0.1.5-3") and len(row["vector"]) == 512
    assert emb_store.get_study("no-such-study", MODEL) is None
    assert emb_store.count("views") == 1800
    before = emb_store.versions("studies")
    emb_store.upsert_studies(study_rows(1, start=900))
    after = emb_store.versions("studies")
    assert len(after) == len(before) + 1 and after[-1]["version"] == emb_store.version("studies")


def test_compaction_keeps_fragments_bounded(tmp_path):
    store = EmbeddingStore(ClipStore.open(tmp_path / "s", create=True), config=StoreConfig(compact_fragments=4))
    for i in range(12):
        store.upsert_studies(study_rows(3, seed=i, start=3 * i))
    assert store.studies.stats()["fragment_stats"]["num_fragments"] <= 5
    assert store.count("studies") == 36


def test_readers_see_whole_commits_while_a_writer_commits(tmp_path):
    store = make_store(tmp_path / "s", n=200, views=False)
    base = [_strip(store.get_study(f"1.2.826.0.1.{i}", MODEL)) for i in range(200)]
    store.upsert_studies([r | {"site": "g0"} for r in base])
    problems: list[str] = []
    done = threading.Event()

    def write():
        for generation in range(1, 9):
            store.upsert_studies([r | {"site": f"g{generation}"} for r in base])
        done.set()

    def read():
        reader = EmbeddingStore.open(store.root)
        while not done.is_set():
            sites = reader.rows("studies", MODEL, ["site"])["site"].to_pylist()
            if len(sites) != 200 or len(set(sites)) != 1:
                problems.append(f"{len(sites)} rows, sites {sorted(set(sites))}")

    threads = [threading.Thread(target=read) for _ in range(2)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems, problems[:3]
    assert set(store.rows("studies", MODEL, ["site"])["site"].to_pylist()) == {"g8"}


def test_views_of_a_new_model_go_in_beside(emb_store):
    rows = view_rows(study_rows(2, model_id="m2"))
    emb_store.upsert_views(rows)
    assert emb_store.count("views", "m2") == 12 and emb_store.count("views", MODEL) == 1800
    assert emb_store.embedded_clip_ids("m2") == {r["clip_id"] for r in rows}


def test_bulk_upsert_from_arrow_matches_dict_upsert(tmp_path):
    import pyarrow as pa

    rows = study_rows(50, seed=3)
    a = EmbeddingStore(ClipStore.open(tmp_path / "a", create=True))
    b = EmbeddingStore(ClipStore.open(tmp_path / "b", create=True))
    a.upsert_studies(rows)
    table = pa.Table.from_pylist(rows)
    table = table.set_column(table.schema.get_field_index("vector"), "vector",
                             table["vector"].cast(pa.list_(pa.float32(), 512)))
    assert b.upsert("studies", table) == (50, 0)
    cols = ["study_uid", "vec_id", "site", "age", "views_present", "vector"]
    assert a.study_rows(MODEL, cols).sort_by("study_uid").equals(b.study_rows(MODEL, cols).sort_by("study_uid"))


def _study_of(store: EmbeddingStore, uid: str) -> tuple[list[dict], list[dict], list[dict]]:
    where = f"study_uid = '{uid}'"
    return tuple(store.clip_store.db.open_table(name).search().where(where).limit(None).to_arrow().to_pylist()
                 for name in ("clips", "views", "studies"))


def _replace_repeatedly(root: str, uid: str, rounds: int, out, drop: int = 1, every: int = 2, start=None) -> None:
    """Put a stored study back ``rounds`` times; every ``every``-th time (from the second)
    without its last ``drop`` clips."""
    store = EmbeddingStore.open(root)
    clips, views, (study,) = _study_of(store, uid)
    errors = []
    if start is not None:  # both writers begin together
        start.wait(120)
    for i in range(rounds):
        keep = clips[: len(clips) - drop] if i % every == every - 1 else clips
        ids = [c["clip_id"] for c in keep]
        pooled = dict(zip(study["clip_ids"], study["attention"]))
        row = dict(study, clip_ids=ids, attention=[pooled[c] for c in ids])
        try:
            store.put_study([dict(c) for c in keep], [dict(v) for v in views if v["clip_id"] in ids], row)
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails on any
            errors.append(repr(error))
    out.put((f"{uid}:{drop}", errors))


def test_two_processes_replacing_studies_at_once_leave_each_whole(trained_store, tmp_path):
    """Two writers (two uvicorn workers) storing studies at once: no lost commit, no mixture."""
    import multiprocessing as mp

    root = tmp_path / "store"
    copy_store(trained_store[0], root)
    store = EmbeddingStore.open(root)
    uids = sorted(set(store.clip_store.clips.to_arrow()["study_uid"].to_pylist()))[:2]
    sizes = {u: len(_study_of(store, u)[0]) for u in uids}
    others = store.clip_store.clips.count_rows() - sum(sizes.values())
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_replace_repeatedly, args=(str(root), u, 7, out)) for u in uids]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(60)
    assert results == {f"{u}:1": [] for u in uids}
    for uid in uids:  # the last round (even) put every clip back
        clips, views, studies = _study_of(store, uid)
        assert len(clips) == len(views) == sizes[uid] and len(studies) == 1
        assert {c["clip_id"] for c in clips} == {v["clip_id"] for v in views} == set(studies[0]["clip_ids"])
    assert store.clip_store.clips.count_rows() == others + sum(sizes.values())


def _put_without_clips(root: str, uid: str, drop: int, out) -> None:
    store = EmbeddingStore.open(root)
    clips, views, (study,) = _study_of(store, uid)
    keep = [c["clip_id"] for c in clips[: len(clips) - drop]]
    pooled = dict(zip(study["clip_ids"], study["attention"]))
    out.put("writing")
    store.put_study([c for c in clips if c["clip_id"] in keep], [v for v in views if v["clip_id"] in keep],
                    dict(study, clip_ids=keep, attention=[pooled[c] for c in keep]))
    out.put("done")


def test_a_study_write_waits_for_another_process_s(trained_store, tmp_path):
    """Writes of studies take a store-wide file lock, so two workers storing the same study
    at once take turns instead of interleaving their clips, views and study rows."""
    import multiprocessing as mp
    import queue

    root = tmp_path / "store"
    copy_store(trained_store[0], root)
    store = EmbeddingStore.open(root)
    uid = min(store.clip_store.clips.to_arrow()["study_uid"].to_pylist())
    n = len(_study_of(store, uid)[0])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with store.write_lock():  # as another worker's put_study or withdraw holds it
        proc = ctx.Process(target=_put_without_clips, args=(str(root), uid, 2, out))
        proc.start()
        assert out.get(timeout=120) == "writing"
        with pytest.raises(queue.Empty):
            out.get(timeout=2)  # it waits for the lock ...
        assert len(_study_of(store, uid)[0]) == n  # ... and has written nothing
    assert out.get(timeout=120) == "done"
    proc.join(60)
    clips, views, (study,) = _study_of(store, uid)
    assert len(clips) == n - 2 and {c["clip_id"] for c in clips} == {v["clip_id"] for v in views} == set(study["clip_ids"])
