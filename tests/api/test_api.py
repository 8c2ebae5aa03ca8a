"""The search service's read endpoints: auth, search, neighbours, studies, cines, heads,
clusters, metrics, and the one shape every error has."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from api_data import copy_api, open_api
from PIL import Image

QUERY = "severe LV dilatation with apical thrombus"


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == status and body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]["message"]


def _uids(api) -> list[str]:
    return [h["study_uid"] for h in api.client.post("/search/text", json={"query": "x", "k": 100}, headers=api.read).json()["hits"]]


def test_health_endpoints_need_no_key(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model_id"] == api.model_id
    assert api.client.get("/").status_code == 200 and "cmr-search" in api.client.get("/").text
    assert api.client.get("/openapi.json").json()["info"]["title"] == "cmr-search"


def test_readyz_and_searches_say_503_until_the_service_has_warmed(trained_store):
    from fastapi.testclient import TestClient

    from cmr_search.api.app import create_app
    from cmr_search.api.settings import ServeSettings

    root, model_id = trained_store
    client = TestClient(create_app(ServeSettings(store=root, auth=False), warm_in_background=False))
    # outside ``with``, the app's lifespan (which warms the service) has not run
    assert client.get("/healthz").json() == {"status": "ok"}
    for r in (client.get("/readyz"), client.post("/search/text", json={"query": "x"})):
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting", r.text
    with client:
        assert client.get("/readyz").json() == {"status": "ready", "model_id": model_id, "sync": None}
        assert client.post("/search/text", json={"query": "x"}).status_code == 200


def test_readyz_waits_for_every_worker_of_cmr_serve(trained_store):
    """Under several workers a warm worker's /readyz says 503 while a sibling is still
    loading: the kernel deals that sibling connections, which it would answer with 503."""
    import os

    from fastapi.testclient import TestClient

    from cmr_search.api.app import create_app
    from cmr_search.api.settings import ServeSettings
    from cmr_search.api.workers import FIELDS, BalancedHttpProtocol, ConnectionShare

    share = ConnectionShare(2)
    share.join()
    BalancedHttpProtocol.share = share  # as WorkerListener sets it in a worker process
    try:
        with TestClient(create_app(ServeSettings(store=trained_store[0], auth=False), warm_in_background=False)) as client:
            raw = share.slots.get_obj()
            raw[FIELDS], raw[FIELDS + 2] = os.getppid(), 0  # a live sibling, still loading
            r = client.get("/readyz")
            assert r.status_code == 503 and r.json()["error"]["message"].startswith("1 of 2 workers"), r.text
            assert client.post("/search/text", json={"query": "x"}).status_code == 200  # this worker is warm
            raw[FIELDS + 2] = 1
            assert client.get("/readyz").json()["status"] == "ready"
    finally:
        BalancedHttpProtocol.share = None


def test_every_data_endpoint_needs_a_valid_key_of_the_right_role(api):
    uid = _uids(api)[0]
    for method, path in [("get", "/heads"), ("get", f"/studies/{uid}"), ("get", f"/studies/{uid}/neighbors"),
                         ("get", "/metrics"), ("get", "/clusters"), ("get", f"/studies/{uid}/predictions")]:
        _error(getattr(api.client, method)(path), 401, "missing_api_key")
        _error(getattr(api.client, method)(path, headers={"Authorization": "Bearer cmr_0000_nope"}), 401, "invalid_api_key")
    _error(api.client.post("/search/text", json={"query": QUERY}), 401, "missing_api_key")
    _error(api.client.delete(f"/studies/{uid}", headers=api.read), 403, "forbidden")
    _error(api.client.post("/studies", files={"files": ("a.dcm", b"x")}, headers=api.read), 403, "forbidden")


def test_a_revoked_key_is_refused_without_a_restart(api):
    from cmr_search.api.auth import KeyRing

    ring = KeyRing(api.root)
    key, record = ring.create("read")
    assert api.client.get("/heads", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    ring.revoke(record.key_id)
    _error(api.client.get("/heads", headers={"Authorization": f"Bearer {key}"}), 401, "invalid_api_key")
    stored = (api.root / "secrets" / "api_keys.json").read_text()
    assert key.split("_", 2)[2] not in stored  # only hashes are kept


def test_text_search_ranks_studies_with_links(api):
    r = api.client.post("/search/text", json={"query": QUERY, "k": 5}, headers=api.read)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == api.model_id and body["level"] == "studies" and len(body["hits"]) == 5
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    assert len({h["study_uid"] for h in body["hits"]}) == 5
    hit = body["hits"][0]
    assert hit["views_present"] and hit["links"]["study"].startswith("/studies/")
    assert hit["viewer_url"] is None  # no viewer_url template configured
    assert "patient_key" not in json.dumps(body)


def test_filters_restrict_results_and_a_view_filter_searches_views(api):
    every = api.client.post("/search/text", json={"query": QUERY, "k": 100}, headers=api.read).json()["hits"]
    women = api.client.post("/search/text", json={"query": QUERY, "k": 100, "filters": {"sex": "F"}}, headers=api.read).json()
    assert women["hits"] and all(h["sex"] == "F" for h in women["hits"])
    assert len(women["hits"]) == sum(h["sex"] == "F" for h in every)  # complete: every match comes back
    sax = api.client.post("/search/text", json={"query": QUERY, "k": 3, "filters": {"view": "SAX"}}, headers=api.read).json()
    assert sax["level"] == "views" and all(h["view"] == "SAX" and h["clip_id"] for h in sax["hits"])
    low = api.client.post("/search/text", json={"query": QUERY, "k": 100, "filters": {"label_max": {"lvef": 40}}},
                          headers=api.read)
    assert low.status_code == 200, low.text


def test_bad_search_requests_get_a_clear_4xx(api):
    post = lambda body: api.client.post("/search/text", json=body, headers=api.read)
    _error(post({"query": QUERY, "k": 0}), 422, "invalid_request")
    assert "100" in _error(post({"query": QUERY, "k": 101}), 422, "k_out_of_range")
    _error(post({"query": ""}), 422, "invalid_request")
    assert _error(post({"query": "  "}), 422, "invalid_request") == "query: the text is blank; describe the findings to look for"
    _error(post({"query": QUERY, "filters": {"colour": "red"}}), 422, "invalid_request")
    message = _error(post({"query": QUERY, "filters": {"label_min": {"no_such_label": 1}}}), 400, "bad_request")
    assert "lvef" in message  # the message lists the columns that exist
    _error(post({"query": QUERY, "filters": {"label_min": {"lvef; DROP": 1}}}), 422, "invalid_request")
    _error(api.client.post("/search/text", content=b"{not json", headers=api.read | {"Content-Type": "application/json"}),
           422, "invalid_request")


def test_neighbors_exclude_the_study_and_optionally_its_patient(api):
    uid = _uids(api)[0]
    r = api.client.get(f"/studies/{uid}/neighbors", params={"k": 4}, headers=api.read)
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 4 and uid not in [h["study_uid"] for h in hits]
    women = api.client.get(f"/studies/{uid}/neighbors", params={"k": 9, "filters": json.dumps({"sex": "F"})},
                           headers=api.read).json()["hits"]
    assert all(h["sex"] == "F" for h in women)
    # the cohort has one patient with two visits: the other visit is a neighbour unless excluded
    rows = api.client.app.state.service.store.study_rows(api.model_id, ["study_uid", "patient_key"]).to_pylist()
    by_patient: dict[str, list[str]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_key"], []).append(row["study_uid"])
    (first, second), = [uids for uids in by_patient.values() if len(uids) == 2]
    every = api.client.get(f"/studies/{first}/neighbors", params={"k": len(rows) - 1}, headers=api.read).json()["hits"]
    assert second in [h["study_uid"] for h in every]
    other = api.client.get(f"/studies/{first}/neighbors", params={"k": len(rows) - 1, "exclude_same_patient": True},
                           headers=api.read)
    assert other.status_code == 200
    found = [h["study_uid"] for h in other.json()["hits"]]
    assert second not in found and first not in found and len(found) == len(rows) - 2


def test_bad_neighbor_requests(api):
    uid = _uids(api)[0]
    _error(api.client.get("/studies/9.9.9/neighbors", headers=api.read), 404, "study_not_found")
    _error(api.client.get(f"/studies/{uid}/neighbors", params={"k": 0}, headers=api.read), 422, "invalid_request")
    _error(api.client.get(f"/studies/{uid}/neighbors", params={"k": 500}, headers=api.read), 422, "k_out_of_range")
    _error(api.client.get(f"/studies/{uid}/neighbors", params={"filters": "{sex:"}, headers=api.read), 422, "invalid_filters")
    _error(api.client.get(f"/studies/{uid}/neighbors", params={"filters": '{"age_min": "old"}'}, headers=api.read),
           422, "invalid_filters")


def test_study_detail_and_its_cines_play(api):
    uid = _uids(api)[0]
    r = api.client.get(f"/studies/{uid}", headers=api.read)
    assert r.status_code == 200, r.text
    study = r.json()
    assert study["embedded"] and study["views"] and set(study["views_present"]) == {v["view"] for v in study["views"]}
    assert abs(sum(v["attention"] for v in study["views"]) - 1) < 1e-4
    source = study["source"]  # the cohort came in as files
    assert (source["kind"], source["archive"]) == ("files", "files") and source["first_seen"] <= source["last_seen"]
    assert study["viewer_url"] is None
    view = study["views"][0]
    cine = api.client.get(view["cine"], headers=api.read)
    assert cine.status_code == 200 and cine.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(cine.content))
    assert image.is_animated and image.n_frames == view["frames"] == 16
    frames = []
    for i in (0, 8):
        image.seek(i)
        frames.append(image.convert("L").tobytes())
    assert frames[0] != frames[1]  # the heart moves
    cached = list((api.root / "cache" / "studies").rglob("cine-*.webp"))
    assert cached and api.client.get(view["cine"], headers=api.read).content == cine.content
    _error(api.client.get(f"/studies/{uid}/views/nope/cine", headers=api.read), 404, "view_not_found")
    _error(api.client.get("/studies/9.9.9", headers=api.read), 404, "study_not_found")


def test_predictions_and_heads(api):
    heads = api.client.get("/heads", headers=api.read).json()
    assert [h["name"] for h in heads] == ["lvef-mil"] and heads[0]["applicable"] and heads[0]["task"] == "regression"
    uid = _uids(api)[0]
    r = api.client.get(f"/studies/{uid}/predictions", headers=api.read)
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert pred["head"] == "lvef-mil" and 0 < pred["prediction"]["lvef"] < 100
    study = api.client.get(f"/studies/{uid}", headers=api.read).json()
    assert {a["clip_id"] for a in pred["attention"]} == {v["clip_id"] for v in study["views"]}
    assert abs(sum(a["weight"] for a in pred["attention"]) - 1) < 1e-4 and pred["attention_source"] == "head"
    _error(api.client.get("/studies/9.9.9/predictions", headers=api.read), 404, "study_not_found")


def test_a_linear_head_shows_the_encoder_s_weight_of_each_view(trained_store, tmp_path):
    from cmr_search.heads import HeadConfig, train_head

    handle = copy_api(trained_store, tmp_path)
    train_head(handle.root, ["lvef"], HeadConfig(kind="linear", max_epochs=3), model_id=handle.model_id,
               name="lvef-linear")
    with handle.client:
        uid = _uids(handle)[0]
        preds = {p["head"]: p for p in handle.client.get(f"/studies/{uid}/predictions", headers=handle.read).json()["predictions"]}
        linear = preds["lvef-linear"]
        assert linear["attention_source"] == "encoder_pooling" and preds["lvef-mil"]["attention_source"] == "head"
        study = handle.client.get(f"/studies/{uid}", headers=handle.read).json()
        pooled = {v["clip_id"]: v["attention"] for v in study["views"]}
        assert {a["clip_id"]: a["weight"] for a in linear["attention"]} == pytest.approx(pooled)
        assert linear["attention"] != preds["lvef-mil"]["attention"]


def test_clusters_are_computed_once_per_table_version(api):
    r = api.client.get("/clusters", headers=api.read)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == api.model_id and body["studies"] == 10
    assert sum(c["size"] for c in body["clusters"]) + body["noise"] == 10
    for c in body["clusters"]:
        assert 1 <= len(c["exemplars"]) <= min(5, c["size"])
    cached = list((api.root / "cache" / "clusters").glob("*.json"))
    assert len(cached) == 1 and api.client.get("/clusters", headers=api.read).json() == body


def test_metrics_in_prometheus_format(api):
    api.client.post("/search/text", json={"query": QUERY, "k": 2}, headers=api.read)
    text = api.client.get("/metrics", headers=api.read).text
    assert 'cmr_requests_total{method="POST",route="/search/text",status="200"}' in text
    assert "cmr_request_seconds_bucket" in text and 'cmr_index_rows{table="studies"} 10.0' in text


def test_unknown_routes_and_methods_keep_the_error_shape(api):
    _error(api.client.get("/nope"), 404, "not_found")
    _error(api.client.put("/heads", headers=api.read), 405, "method_not_allowed")


def test_concurrent_searches_from_many_threads(api):
    uids = _uids(api)

    def one(i: int) -> int:
        if i % 2:
            return api.client.post("/search/text", json={"query": f"{QUERY} {i}", "k": 3}, headers=api.read).status_code
        return api.client.get(f"/studies/{uids[i % len(uids)]}/neighbors", params={"k": 3}, headers=api.read).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(64))) == {200}


def test_searches_are_not_held_back_by_a_busy_pool(trained_store, monkeypatch):
    """Searches run on their own thread: with the general pool (serve_threads=1) held by a
    slow request, text and neighbour searches still answer."""
    handle = open_api(*trained_store, serve_threads=1)
    with handle.client:
        service, release = handle.client.app.state.service, threading.Event()
        slow_study = service.study
        monkeypatch.setattr(service, "study", lambda uid: release.wait(60) and slow_study(uid))
        uid = _uids(handle)[0]
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(handle.client.get, f"/studies/{uid}", headers=handle.read)
            time.sleep(0.5)
            assert not held.done()  # it holds the only pool thread
            searched = pool.submit(lambda: [
                handle.client.post("/search/text", json={"query": QUERY, "k": 3}, headers=handle.read).status_code,
                handle.client.get(f"/studies/{uid}/neighbors", headers=handle.read).status_code])
            try:
                assert searched.result(timeout=30) == [200, 200]
                assert not held.done()
            finally:
                release.set()
            assert held.result(timeout=30).status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/static/app.js", "/static/style.css"])
def test_page_and_docs_are_served_without_a_key(api, path):
    assert api.client.get(path).status_code == 200


def test_a_viewer_url_template_links_every_hit_and_the_study_to_the_archive_viewer(trained_store):
    root, model_id = trained_store
    template = "https://viewer.example/viewer?StudyInstanceUIDs={study_uid}&x={{literal}}"
    handle = open_api(root, model_id, viewer_url=template)
    with handle.client:
        body = handle.client.post("/search/text", json={"query": QUERY, "k": 3}, headers=handle.read).json()
        uid = body["hits"][0]["study_uid"]
        want = f"https://viewer.example/viewer?StudyInstanceUIDs={uid}&x={{literal}}"  # a UID needs no escaping
        assert body["hits"][0]["viewer_url"] == want and all(h["viewer_url"] for h in body["hits"])
        near = handle.client.get(f"/studies/{uid}/neighbors", params={"k": 2}, headers=handle.read).json()["hits"]
        assert all(h["viewer_url"].endswith(f"UIDs={h['study_uid']}&x={{literal}}") for h in near)
        study = handle.client.get(f"/studies/{uid}", headers=handle.read).json()
        assert study["viewer_url"] == want and study["source"]["kind"] == "files"
