"""Two machines on one store on object storage (moto standing in for S3, each machine a state
folder of its own): the second sees the first's encoders and default model, searches with its
index generation downloaded rather than rebuilt, applies its heads, accepts its API keys,
and after a withdrawal on the first neither it nor any index generation in the bucket holds
the study; an older index generation never replaces the shared one."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from io import BytesIO
from types import SimpleNamespace

import numpy as np
import pytest
from cli_runner import cmr
from fastapi.testclient import TestClient
from tiny_models import tiny_encoder_config

from cmr_search.api.app import create_app
from cmr_search.api.auth import KeyRing
from cmr_search.api.settings import URI_CHECK_INTERVAL_S, ServeSettings
from cmr_search.core.layout import StoreLayout
from cmr_search.core.location import store_root
from cmr_search.heads import HeadConfig, HeadRegistry, train_head
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import vec_id
from cmr_search.store.index.files import IndexFiles, _version
from cmr_search.store.shared import shared_state

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PREFIX = "archive/site-a"


@pytest.fixture(scope="module")
def two(s3, cohort, tmp_path_factory):
    """Machine A ingests the cohort into ``s3://<bucket>/archive/site-a``, trains a 1-step
    tiny encoder and embeds it (its index built and shared); machine B is only a fresh state
    folder. ``on(machine)`` points CMR_STATE_DIR at one of them."""
    from cmr_search.encoder.train import Trainer

    with pytest.MonkeyPatch.context() as mp:
        bucket = s3.new_bucket()
        s3.apply_env(mp)
        for name in ("CMR_STORE", "CMR_PATIENT_SALT"):
            mp.delenv(name, raising=False)
        a, b = tmp_path_factory.mktemp("machine-a"), tmp_path_factory.mktemp("machine-b")
        uri = s3.uri(bucket, PREFIX)

        @contextmanager
        def on(state):
            with pytest.MonkeyPatch.context() as machine:
                machine.setenv("CMR_STATE_DIR", str(state))
                yield

        with on(a):
            cmr("ingest", cohort / "dicom", "--store", uri, "--reports", cohort / "reports.csv", "--labels",
                cohort / "labels.csv", "--workers", "2", codes=(0, 3))  # 3: the cohort's decoys are rejected
            trained = Trainer(a, tiny_encoder_config(), run_dir=tmp_path_factory.mktemp("run"), progress=False,
                              log=lambda *_: None).fit(max_steps=1)
            model_id = json.loads(cmr("embed", "--store", uri, "--checkpoint", trained.checkpoint, "--device", "cpu",
                                      "--json"))["model_id"]
        store_root(uri, b)  # B's state folder, bound to the URI: nothing else in it yet
        yield SimpleNamespace(uri=uri, bucket=bucket, a=a, b=b, on=on, model_id=model_id, s3=s3,
                              shared=shared_state(StoreLayout(a)))


def _uids(result: dict) -> list[str]:
    return [h["study_uid"] for h in result["hits"]]


def test_b_sees_the_encoders_and_default_of_a(two):
    rows = {}
    for machine in (two.a, two.b):
        with two.on(machine):
            rows[machine] = json.loads(cmr("encoders", "list", "--store", two.uri, "--json"))
    assert [(r["model_id"], r["default"], r["origin"]) for r in rows[two.b]] == \
           [(r["model_id"], r["default"], r["origin"]) for r in rows[two.a]]
    assert [r["model_id"] for r in rows[two.b] if r["default"]] == [two.model_id]
    layout = StoreLayout(two.b)
    assert layout.default_model_id() == two.model_id == layout.latest_model_id()
    assert (layout.encoder(two.model_id) / "model.safetensors").read_bytes() == \
           (StoreLayout(two.a).encoder(two.model_id) / "model.safetensors").read_bytes()
    assert two.shared.get("encoders/DEFAULT").data.decode().strip() == two.model_id


def test_search_on_b_gives_the_hits_of_a_from_the_downloaded_generation(two, caplog):
    uid = min(ClipStore.open(two.a).study_uids())
    found = {}
    for machine in (two.a, two.b):
        with two.on(machine), caplog.at_level(logging.INFO, "cmr_search.store.index.files"):
            found[machine] = (json.loads(cmr("search", "--store", two.uri, "--study", uid, "-k", "5", "--json")),
                              json.loads(cmr("search", "--store", two.uri, "--text", "dilated left ventricle",
                                             "-k", "5", "--json")))
    for by_a, by_b in zip(found[two.a], found[two.b]):
        assert len(_uids(by_a)) == 5 and _uids(by_b) == _uids(by_a)
        assert by_b["model_id"] == two.model_id
    for table in ("studies", "views"):
        assert two.shared.get(f"indexes/{table}/{two.model_id}/CURRENT").data.decode() == \
               IndexFiles(StoreLayout(two.a).index(table, two.model_id)).current()
    shared = two.shared.get(f"indexes/studies/{two.model_id}/CURRENT").data.decode()
    # B searched studies with A's generation (a rebuild would have a name of its own), views not yet
    assert IndexFiles(StoreLayout(two.b).index("studies", two.model_id)).current() == shared
    assert not StoreLayout(two.b).index("views", two.model_id).exists()
    assert "downloaded generation" in caplog.text


def test_a_head_registered_on_a_is_applied_on_b(two):
    with two.on(two.a):
        train_head(two.a, ["reduced_lvef"], HeadConfig(kind="mil", max_epochs=2), name="rlvef")
    key, _ = KeyRing(two.a).create("read", "from machine A")
    uid = min(ClipStore.open(two.a).study_uids())
    with TestClient(create_app(ServeSettings(store=two.b, cluster_min_size=2), warm_in_background=False)) as client:
        auth = {"Authorization": f"Bearer {key}"}  # a key made on A, accepted by B's service
        heads = client.get("/heads", headers=auth).json()
        assert [(h["name"], h["applicable"]) for h in heads] == [("rlvef", True)]
        (pred,) = client.get(f"/studies/{uid}/predictions", headers=auth).json()["predictions"]
        assert pred["head"] == "rlvef" and 0 <= pred["prediction"]["reduced_lvef"] <= 1
        text = client.post("/search/text", json={"query": "dilated left ventricle", "k": 3}, headers=auth)
        assert text.status_code == 200 and len(text.json()["hits"]) == 3
        assert client.get("/heads", headers={"Authorization": f"Bearer {KeyRing.new_key()}"}).status_code == 401
    # re-registered under its name on A: B's copy is replaced (the shared head.json changed)
    before = HeadRegistry(two.b).card("rlvef")["created_at"], (two.b / "heads" / "rlvef" / "model.safetensors").read_bytes()
    with two.on(two.a):
        train_head(two.a, ["lvef"], HeadConfig(kind="mil", max_epochs=2), name="rlvef", replace=True)
    card = HeadRegistry(two.b).card("rlvef")
    assert card["labels"] == ["lvef"] and (card["created_at"], (two.b / "heads" / "rlvef" / "model.safetensors").read_bytes()) != before
    assert len([k for k in two.shared.list("heads/rlvef") if k.endswith(".safetensors")]) == 1  # the old weights left


def test_keys_are_shared_and_revoked_everywhere(two):
    key, record = KeyRing(two.a).create("write", "shared")
    on_b = KeyRing(two.b, refresh_s=0)
    assert on_b.verify(key) == record and record.key_id in {k.key_id for k in on_b.list()}
    KeyRing(two.b).revoke(record.key_id)
    assert KeyRing(two.a, refresh_s=0).verify(key) is None
    assert not StoreLayout(two.b).api_keys.exists()  # nothing of them in B's state folder
    assert ServeSettings().check_interval(True) == URI_CHECK_INTERVAL_S and ServeSettings().check_interval(False) == 0


def test_a_withdrawal_on_a_leaves_b_and_every_shared_generation(two):
    clips = ClipStore.open(two.a)
    uid = max(clips.study_uids())
    rows = clips.clips.to_arrow().select(["study_uid", "clip_id"]).to_pylist()
    gone = {vec_id(uid)} | {vec_id(r["clip_id"]) for r in rows if r["study_uid"] == uid}  # its study and views
    settings = ServeSettings(store=two.b, cluster_min_size=2, auth=False, check_interval_s=0)
    with TestClient(create_app(settings, warm_in_background=False)) as client:
        other = min(clips.study_uids())
        assert uid in _uids(client.get(f"/studies/{other}/neighbors?k=100").json())
        with two.on(two.a):
            assert json.loads(cmr("delete", "--store", two.uri, "--study", uid, "--json"))["rows_deleted"]["studies"] == 1
        hits = _uids(client.get(f"/studies/{other}/neighbors?k=100").json())
        assert hits and uid not in hits
        assert client.get(f"/studies/{uid}/neighbors").status_code == 404
    with two.on(two.b):
        assert uid not in _uids(json.loads(cmr("search", "--store", two.uri, "--study", other, "-k", "100", "--json")))
    generations = [k for k in two.shared.list("indexes") if k.endswith("/ids.npy")]
    assert len(generations) >= 2
    for key in generations:  # (B's own save of a newer version may be on its way up: it holds none either)
        ids = np.load(BytesIO(two.shared.get(key).data))
        assert len(ids) and not gone & set(ids.tolist()), key
    for table in ("studies", "views"):
        current = two.shared.get(f"indexes/{table}/{two.model_id}/CURRENT").data.decode()
        assert _version(current) >= _version(IndexFiles(StoreLayout(two.a).index(table, two.model_id)).current())
        held = {k.split("/")[3] for k in generations if k.startswith(f"indexes/{table}/")}
        assert current in held and all(_version(g) >= _version(current) for g in held)  # the older ones deleted


def test_an_older_generation_never_replaces_the_shared_current(s3, tmp_path, monkeypatch):
    import faiss

    from cmr_search.store.shared import SharedState

    s3.apply_env(monkeypatch)
    shared, key = SharedState(s3.uri(s3.new_bucket(), PREFIX)), "indexes/studies/m"
    a, b = IndexFiles(tmp_path / "a", shared, key), IndexFiles(tmp_path / "b", shared, key)
    ids = np.arange(3, dtype=np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    index.add_with_ids(np.eye(3, 4, dtype=np.float32), ids)
    blob = faiss.serialize_index(index)

    def save(files: IndexFiles, version: int) -> str:
        return files.write(blob, ids, ids, {"version": version, "kind": "exact", "rows": 3, "dim": 4})

    def shared_generations() -> set[str]:
        return {k.split("/")[3] for k in shared.list(key) if k.count("/") > 3}

    newer = save(a, 7)
    older = save(b, 5)  # B's slow save of an older table version: switched to on B only
    assert b.current() == older and shared.get(f"{key}/CURRENT").data.decode() == newer
    assert shared_generations() == {newer}
    assert b.load(4) is not None and b.current() == b.downloaded == newer  # B catches up by download
    newest = save(b, 9)
    assert shared.get(f"{key}/CURRENT").data.decode() == newest and shared_generations() == {newest}
    assert a.load(4) is not None and a.current() == newest
