"""``cmr serve --sync URL``: the service pulls a study that appears in a real Orthanc,
ingests and embeds it, and answers for it; /readyz and /metrics show the sync's state."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from orthanc import remove, start_orthanc
from store_data import copy_store

from cmr_search.api.app import create_app
from cmr_search.api.auth import KeyRing
from cmr_search.api.settings import ServeSettings


@pytest.fixture()
def new_archive_study(tmp_path):
    """An Orthanc holding one synthetic study the test store does not have: (server, study_uid)."""
    import pydicom

    from cmr_search.synth import generate_cohort

    generate_cohort(1, tmp_path / "c", seed=4243, workers=1, progress=False)
    files = sorted((tmp_path / "c" / "dicom").rglob("*.dcm"))
    server = start_orthanc(tmp_path / "orthanc")
    try:
        server.upload(files)
        yield server, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    finally:
        remove(server)


def test_the_service_syncs_a_new_study_and_reports_it(trained_store, new_archive_study, tmp_path, monkeypatch, salt):
    root, _ = trained_store
    store = tmp_path / "store"
    copy_store(root, store)
    server, study_uid = new_archive_study
    user, password = server.auth
    monkeypatch.setenv("PACS_PW", password)
    monkeypatch.setenv("CMR_PATIENT_SALT", salt.decode())
    key, _ = KeyRing(store).create("read", "tests")
    settings = ServeSettings(store=store, sync_url=server.dicomweb, sync_every_s=1.0, sync_user=user,
                             sync_password_env="PACS_PW")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, warm_in_background=False)) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = client.get("/readyz").json()
            if (ready.get("sync") or {}).get("cycles", 0) >= 1:
                break
            time.sleep(0.2)
        sync = ready["sync"]
        assert sync["studies_added"] == 1 and sync["last_error"] is None and password not in str(sync)
        hits = client.get(f"/studies/{study_uid}/neighbors", params={"k": 3}, headers=headers)
        assert hits.status_code == 200 and len(hits.json()["hits"]) == 3
        metrics = client.get("/metrics", headers=headers).text
        assert "cmr_sync_cycles_total" in metrics and "cmr_sync_failing" in metrics
        assert password not in metrics


def test_a_sync_without_its_secret_refuses_to_start(trained_store, tmp_path, monkeypatch):
    root, _ = trained_store
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    settings = ServeSettings(store=root, sync_url="http://127.0.0.1:9/dicom-web", sync_token_env="NO_SUCH_VAR")
    from cmr_search.core.exceptions import InputError

    with pytest.raises(InputError, match="NO_SUCH_VAR"):
        create_app(settings, warm_in_background=False)
