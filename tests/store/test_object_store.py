"""A store on object storage (``--store s3://bucket/prefix``, moto standing in for S3): the
command line's ingest, embed, search and delete keep every Lance table in the bucket, the shared
state beside them and the rest in the local state folder; a withdrawn study leaves the bucket; a
bucket that cannot be reached is one clear error; a new state folder joins the store
(tests/store/test_shared_store.py: several machines)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from cli_runner import cmr
from s3 import free_port
from tiny_models import tiny_encoder_config

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout
from cmr_search.core.location import state_dir_for, store_root
from cmr_search.core.settings import Settings
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PREFIX = "archive/site-a"
TABLES = ("clips", "reports", "labels", "sources", "views", "studies")


@pytest.fixture(scope="module")
def on_s3(s3, cohort, tmp_path_factory):
    """The cohort ingested into ``s3://<bucket>/archive/site-a`` with the store's own salt, a
    1-step tiny encoder trained on it and embedded: (uri, bucket, state folder, model_id)."""
    from cmr_search.encoder.train import Trainer

    with pytest.MonkeyPatch.context() as mp:
        bucket = s3.new_bucket()
        s3.apply_env(mp)
        state = tmp_path_factory.mktemp("state")
        mp.setenv("CMR_STATE_DIR", str(state))
        for name in ("CMR_STORE", "CMR_PATIENT_SALT"):
            mp.delenv(name, raising=False)
        uri = s3.uri(bucket, PREFIX)
        cmr("ingest", cohort / "dicom", "--store", uri, "--reports", cohort / "reports.csv", "--labels",
            cohort / "labels.csv", "--workers", "2", codes=(0, 3))  # 3: the cohort's decoys are rejected
        trained = Trainer(state, tiny_encoder_config(), run_dir=tmp_path_factory.mktemp("run"), progress=False,
                          log=lambda *_: None).fit(max_steps=1)
        out = cmr("embed", "--store", uri, "--checkpoint", trained.checkpoint, "--device", "cpu", "--json")
        model_id = json.loads(out)["model_id"]
        yield SimpleNamespace(uri=uri, bucket=bucket, state=state, model_id=model_id, s3=s3)


def _objects(where) -> dict[str, bytes]:
    return {key: where.s3.read(key, where.bucket) for key in where.s3.keys(bucket=where.bucket)}


def test_the_tables_are_in_the_bucket_and_the_rest_in_the_state_folder(on_s3):
    keys = on_s3.s3.keys(bucket=on_s3.bucket)
    assert keys and all(k.startswith((f"{PREFIX}/lance/", f"{PREFIX}/state/")) for k in keys), keys[:5]
    assert {k.split("/")[3] for k in keys if k.startswith(f"{PREFIX}/lance/")} == {f"{t}.lance" for t in TABLES}
    layout = StoreLayout(on_s3.state)
    assert layout.uri == on_s3.uri and layout.lance == f"{on_s3.uri}/lance"
    meta = json.loads(layout.meta.read_text())
    assert meta["uri"] == on_s3.uri and meta["tables"] == f"{on_s3.uri}/lance"
    assert layout.patient_salt.exists() and layout.encoder(on_s3.model_id).is_dir() and layout.indexes.is_dir()
    local = [p for p in on_s3.state.rglob("*") if p.is_file()]
    assert not (on_s3.state / "lance").exists() and not [p for p in local if ".lance" in str(p)]
    store = EmbeddingStore.open(on_s3.state)
    assert store.count("studies", on_s3.model_id) == len(store.clip_store.study_uids()) > 0


def test_search_by_study_and_by_text(on_s3):
    uid = min(ClipStore.open(on_s3.state).study_uids())
    hits = json.loads(cmr("search", "--store", on_s3.uri, "--study", uid, "-k", "3", "--json"))["hits"]
    assert len(hits) == 3 and uid not in {h["study_uid"] for h in hits}
    found = json.loads(cmr("search", "--store", on_s3.uri, "--text", "dilated left ventricle", "-k", "2", "--json"))
    assert found["model_id"] == on_s3.model_id and len(found["hits"]) == 2


def test_the_bucket_holds_no_patient_identifier_and_the_salt_only_as_itself(on_s3):
    salt = StoreLayout(on_s3.state).patient_salt.read_bytes().strip()
    for key, data in _objects(on_s3).items():
        assert b"ZZSYNTH" not in data, key  # every identifier the generator wrote carries it
        assert salt not in data or key == f"{PREFIX}/state/secrets/patient_salt", key  # shared by every machine


def test_delete_removes_the_study_from_every_table_and_object(on_s3):
    clips = ClipStore.open(on_s3.state)
    uids = clips.study_uids()
    uid = next(u for u in sorted(uids) if not any(u in o for o in uids - {u}))  # no other uid contains it
    assert any(uid.encode() in data for data in _objects(on_s3).values())
    report = json.loads(cmr("delete", "--store", on_s3.uri, "--study", uid, "--json"))
    assert report["rows_deleted"]["clips"] > 0 and report["rows_deleted"]["studies"] == 1
    for table in TABLES:
        assert clips.db.open_table(table).count_rows(f"study_uid = '{uid}'") == 0, table
    assert not [k for k, data in _objects(on_s3).items() if uid.encode() in data]  # old versions purged too
    assert not [p for p in on_s3.state.rglob("*") if p.is_file() and uid.encode() in p.read_bytes()]


def test_a_local_store_is_a_folder_as_before(tmp_path):
    assert store_root(tmp_path / "store") == tmp_path / "store" and store_root(str(tmp_path)) == tmp_path
    layout = StoreLayout(tmp_path)
    assert layout.local and layout.lance == tmp_path / "lance" and layout.table("clips") == tmp_path / "lance" / "clips.lance"


def test_a_uri_maps_to_its_state_folder_bound_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = store_root("S3://bucket/a/b/")
    assert root == tmp_path / "cache" / "cmr" / "stores" / "s3" / "bucket" / "a" / "b"
    assert StoreLayout(root).uri == "s3://bucket/a/b" and StoreLayout(root).table("x") == "s3://bucket/a/b/lance/x.lance"
    assert StoreLayout(root).table_versions("x") is None  # the freshness check asks Lance
    assert state_dir_for("gs://bucket/a/b") != root
    mine = tmp_path / "state"
    assert store_root("s3://bucket/a", mine) == mine == store_root("s3://bucket/a/", mine)
    with pytest.raises(StoreError, match="belongs to s3://bucket/a"):
        store_root("s3://other/a", mine)
    with pytest.raises(StoreError, match="not a store URI"):
        store_root("s3:///a", mine)
    monkeypatch.setenv("CMR_STATE_DIR", str(mine))
    monkeypatch.setenv("CMR_STORE", "s3://bucket/a")
    assert Settings().store == mine and Settings().state_dir == mine


def test_an_unreachable_bucket_is_one_line_saying_what_to_set(s3, tmp_path, monkeypatch):
    s3.apply_env(monkeypatch)
    monkeypatch.setenv("CMR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    out = cmr("ingest", tmp_path, "--store", "s3://nowhere/p", codes=(2,))
    assert "cannot reach s3://nowhere/p" in out and "AWS_ACCESS_KEY_ID" in out
    assert len([line for line in out.splitlines() if line.strip()]) == 1


def test_a_new_state_folder_joins_the_store(on_s3, tmp_path):
    joined = ClipStore.open(store_root(on_s3.uri, tmp_path / "elsewhere"))  # another machine's state folder
    assert joined.clip_config == ClipStore.open(on_s3.state).clip_config
    assert joined.study_uids() == ClipStore.open(on_s3.state).study_uids()
