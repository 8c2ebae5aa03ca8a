"""Uploading a new study: round trip with and without storing it, withdrawal, and every kind
of bad upload refused with a clear 4xx and nothing stored."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pydicom
import pytest
from api_data import copy_api
from store_data import copy_store


def _zip(folder: Path, without: str | None = None) -> bytes:
    """The study folder as a zip (leaving out the series whose folder names ``without``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not (without and without in path.parent.name):
                archive.write(path, path.relative_to(folder.parent).as_posix())
    return buf.getvalue()


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    return response.json()["error"]["message"]


def _upload(api, content: bytes, name: str = "study.zip", persist: bool = True, headers=None):
    return api.client.post("/studies", params={"persist": persist}, files={"files": (name, content)},
                           headers=headers or api.write)


def _study_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _clip_count(api, uid: str) -> int:
    from cmr_search.store import ClipStore

    return ClipStore.open(api.root).count_clips(f"study_uid = '{uid}'")


def test_upload_without_storing_answers_neighbors_and_predictions(private_api, new_study):
    api, uid = private_api, _study_uid(new_study)
    r = _upload(api, _zip(new_study), persist=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["study_uid"] == uid and not body["persisted"] and not body["replaced"]
    assert len(body["neighbors"]) == 10 and uid not in [h["study_uid"] for h in body["neighbors"]]
    (pred,) = body["predictions"]
    assert pred["head"] == "lvef-mil" and len(pred["attention"]) >= 4
    assert {"4CH", "SAX"} <= set(body["views_present"])
    assert _clip_count(api, uid) == 0 and not list((api.root / "tmp").glob("upload-*"))
    _error(api.client.get(f"/studies/{uid}", headers=api.read), 404, "study_not_found")
    # no patient identifier of the upload in the answer
    ds = pydicom.dcmread(next(new_study.rglob("*.dcm")), stop_before_pixels=True)
    for value in (str(ds.PatientName), str(ds.PatientID)):
        assert value and value not in r.text


def test_upload_round_trip_then_withdrawal(private_api, new_study):
    api, uid = private_api, _study_uid(new_study)
    r = _upload(api, _zip(new_study))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["persisted"] and body["views"] and _clip_count(api, uid) == len(body["views"])
    study = api.client.get(f"/studies/{uid}", headers=api.read).json()
    assert study["embedded"] and len(study["views"]) == len(body["views"])
    assert api.client.get(study["views"][0]["cine"], headers=api.read).status_code == 200
    # searchable at once, by neighbours of itself and of others
    near = api.client.get(f"/studies/{uid}/neighbors", params={"k": 3}, headers=api.read).json()["hits"]
    assert [h["study_uid"] for h in near] == [h["study_uid"] for h in body["neighbors"][:3]]
    assert api.client.get(f"/studies/{uid}/predictions", headers=api.read).json()["predictions"]
    every = api.client.post("/search/text", json={"query": "x", "k": 11}, headers=api.read).json()["hits"]
    assert uid in [h["study_uid"] for h in every]

    again = _upload(api, _zip(new_study))
    assert again.status_code == 200 and again.json()["replaced"]
    assert _clip_count(api, uid) == len(body["views"])  # replaced, not duplicated

    gone = api.client.delete(f"/studies/{uid}", headers=api.write)
    assert gone.status_code == 200 and gone.json()["rows_deleted"]["clips"] == len(body["views"])
    every = api.client.post("/search/text", json={"query": "x", "k": 100}, headers=api.read).json()["hits"]
    assert uid not in [h["study_uid"] for h in every] and len(every) == 10
    _error(api.client.get(f"/studies/{uid}", headers=api.read), 404, "study_not_found")
    _error(api.client.get(f"/studies/{uid}/neighbors", headers=api.read), 404, "study_not_found")
    from cmr_search.core.layout import StoreLayout

    assert not StoreLayout(api.root).study_cache(uid).exists()  # its cines left with it
    _error(api.client.delete(f"/studies/{uid}", headers=api.write), 404, "study_not_found")


def test_loose_dicom_files_upload_too(private_api, new_study):
    files = [("files", (p.name, p.read_bytes())) for p in sorted(new_study.rglob("*.dcm"))]
    r = private_api.client.post("/studies", params={"persist": False}, files=files, headers=private_api.write)
    assert r.status_code == 200, r.text
    assert r.json()["study_uid"] == _study_uid(new_study)


def _bad_zip(members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def test_malicious_and_broken_uploads_are_refused(private_api, new_study):
    api = private_api
    _error(_upload(api, b"this is not dicom", name="notes.txt"), 422, "no_cine_study")
    _error(_upload(api, _bad_zip({"../../etc/evil.dcm": b"x"})), 400, "unsafe_zip")
    _error(_upload(api, _bad_zip({"/abs/evil.dcm": b"x"})), 400, "unsafe_zip")
    message = _error(_upload(api, _bad_zip({"bomb.dcm": b"\0" * (64 << 20)})), 400, "zip_bomb")
    assert "zip bomb" in message
    # many members of 1 MiB of zeros: each passes the per-member check, the archive does not
    many = _bad_zip({f"m{i:04d}.dcm": b"\0" * (1 << 20) for i in range(300)})
    assert len(many) < 2 << 20
    message = _error(_upload(api, many), 400, "zip_bomb")
    assert "unpacks" in message and not list((api.root / "tmp").glob("upload-*"))
    _error(_upload(api, b"PK\x03\x04 truncated"), 400, "bad_zip")
    _error(api.client.post("/studies", headers=api.write), 422, "invalid_request")  # no files at all
    assert not list((api.root / "tmp").glob("upload-*"))  # every refusal cleaned up


def test_two_studies_in_one_upload_are_refused(private_api, new_study, cohort):
    first = next((cohort / "dicom").iterdir())
    files = [("files", ("a.zip", _zip(new_study))), ("files", ("b.zip", _zip(first)))]
    r = private_api.client.post("/studies", files=files, headers=private_api.write)
    _error(r, 400, "several_studies")
    assert _clip_count(private_api, _study_uid(new_study)) == 0


def test_upload_limits(trained_store, tmp_path, new_study):
    small = copy_api(trained_store, tmp_path, max_upload_bytes=200_000, max_upload_files=5,
                     max_unzipped_bytes=400_000)
    with small.client:
        content = _zip(new_study)
        assert len(content) > 200_000
        assert "limit" in _error(_upload(small, content), 413, "upload_too_large")
        many = _bad_zip({f"f{i}.dcm": b"x" for i in range(6)})
        _error(_upload(small, many), 413, "too_many_files")
        loose = [("files", (f"f{i}.dcm", b"x")) for i in range(6)]  # refused while the form is parsed
        assert "CMR_MAX_UPLOAD_FILES" in _error(small.client.post("/studies", files=loose, headers=small.write),
                                                413, "too_many_files")
        big = _bad_zip({"a.dcm": b"\1" * 150_000}, zipfile.ZIP_STORED)
        r = small.client.post("/studies", files=[("files", ("a.zip", big)), ("files", ("b.zip", big))],
                              headers=small.write)
        _error(r, 413, "upload_too_large")
        # unpacks to more than CMR_MAX_UNZIPPED_BYTES (ratio 5x: no zip bomb, only too big)
        wide = _bad_zip({f"m{i}.dcm": bytes(range(256)) * 400 + bytes(20_000) for i in range(4)})
        assert len(wide) < 200_000
        assert "CMR_MAX_UNZIPPED_BYTES" in _error(_upload(small, wide), 413, "upload_too_large")

        # past the limit with the framing allowance: refused by its Content-Length, before the body is read
        huge = b"\1" * (200_000 + (1 << 20) + 1)
        message = _error(_upload(small, huge, name="huge.dcm"), 413, "upload_too_large")
        assert "200,000 bytes (CMR_MAX_UPLOAD_BYTES" in message
        # ... and the same body sent chunked (no Content-Length) as it passes the limit
        boundary = "cmrtest"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge.dcm\"\r\n"
                "Content-Type: application/dicom\r\n\r\n").encode()

        def chunks():
            yield head
            for _ in range(24):
                yield b"\1" * 65536
            yield f"\r\n--{boundary}--\r\n".encode()

        r = small.client.post("/studies", content=chunks(),
                              headers={**small.write, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert "CMR_MAX_UPLOAD_BYTES" in _error(r, 413, "upload_too_large")
        assert not list((small.root / "tmp").glob("upload-*"))


def test_links_and_encrypted_zip_members_are_refused(private_api, new_study):
    link = zipfile.ZipInfo("study/evil.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(link, "/etc/passwd")
    assert "symbolic link" in _error(_upload(private_api, buf.getvalue()), 400, "unsafe_zip")
    locked = bytearray(_bad_zip({"study/a.dcm": b"x" * 100}, zipfile.ZIP_STORED))
    # the general-purpose flag's bit 0 marks a member encrypted, in its local and central headers
    for header in (b"PK\x03\x04", b"PK\x01\x02"):
        at = locked.index(header) + (6 if header == b"PK\x03\x04" else 8)
        locked[at] |= 0x1
    assert "encrypted" in _error(_upload(private_api, bytes(locked)), 400, "unsafe_zip")
    assert _clip_count(private_api, _study_uid(new_study)) == 0


def test_writes_need_a_valid_key(private_api, new_study):
    api, uid = private_api, _study_uid(new_study)
    assert _upload(api, _zip(new_study)).status_code == 200
    for headers in ({}, {"Authorization": "Bearer cmr_nope_nope"}):
        code = "missing_api_key" if not headers else "invalid_api_key"
        _error(api.client.post("/studies", files={"files": ("s.zip", b"PK")}, headers=headers), 401, code)
        _error(api.client.delete(f"/studies/{uid}", headers=headers), 401, code)
    _error(api.client.delete(f"/studies/{uid}", headers=api.read), 403, "forbidden")
    assert _clip_count(api, uid) > 0  # still there


def test_a_failed_write_leaves_nothing_half_stored(private_api, new_study, monkeypatch):
    api, uid = private_api, _study_uid(new_study)
    service = api.client.app.state.service

    def broken(rows):
        raise OSError("disk full")

    monkeypatch.setattr(service.store, "upsert_studies", broken)
    from fastapi.testclient import TestClient

    client = TestClient(api.client.app, raise_server_exceptions=False)  # see the 500 the user would see
    r = client.post("/studies", files={"files": ("s.zip", _zip(new_study))}, headers=api.write)
    _error(r, 500, "internal")
    assert "disk full" not in r.text
    monkeypatch.undo()
    assert _clip_count(api, uid) == 0
    views = service.store.rows("views", api.model_id, ["study_uid"], f"study_uid = '{uid}'")
    assert views.num_rows == 0 and not service.searcher.has_study(uid)


def _study_rows(service, uid: str) -> dict[str, list[dict]]:
    """Every row the store holds of a study, per table, without the pixel bytes."""
    where = f"study_uid = '{uid}'"
    out = {}
    for name in ("clips", "views", "studies"):
        table = service.store.clip_store.db.open_table(name)
        rows = table.search().where(where).limit(None).to_arrow().drop_columns(["clip"] if name == "clips" else [])
        out[name] = sorted(rows.to_pylist(), key=lambda r: (r.get("clip_id") or "", r.get("model_id", "")))
    return out


def test_a_new_upload_of_a_stored_study_replaces_all_of_it(private_api, new_study):
    api, uid = private_api, _study_uid(new_study)
    service = api.client.app.state.service
    full = _upload(api, _zip(new_study)).json()
    assert any(v["view"] == "SAX" for v in full["views"])
    # the same study again, without its short-axis stack: the stack leaves the store
    r = _upload(api, _zip(new_study, without="SAX"))
    assert r.status_code == 200 and r.json()["replaced"], r.text
    kept = {v["clip_id"] for v in r.json()["views"]}
    assert kept and len(kept) < len(full["views"]) and all(v["view"] != "SAX" for v in r.json()["views"])
    study = api.client.get(f"/studies/{uid}", headers=api.read).json()
    assert {v["clip_id"] for v in study["views"]} == kept
    assert all(v["attention"] is not None for v in study["views"])  # every view is in the study embedding
    rows = _study_rows(service, uid)
    assert {r["clip_id"] for r in rows["clips"]} == {r["clip_id"] for r in rows["views"]} == kept
    assert len(rows["studies"]) == 1 and set(rows["studies"][0]["clip_ids"]) == kept
    preds = api.client.get(f"/studies/{uid}/predictions", headers=api.read).json()["predictions"]
    mil = next(p for p in preds if p["attention"] and len(p["attention"]) > 1)
    assert {a["clip_id"] for a in mil["attention"]} == kept
    # a view-level search no longer finds the clips that left
    hits = api.client.post("/search/text", json={"query": "short axis", "k": 100, "filters": {"view": "SAX"}},
                           headers=api.read).json()["hits"]
    assert uid not in [h["study_uid"] for h in hits]


def test_a_failed_replacement_puts_the_stored_study_back(private_api, new_study, monkeypatch):
    api, uid = private_api, _study_uid(new_study)
    service = api.client.app.state.service
    assert _upload(api, _zip(new_study)).status_code == 200
    before = _study_rows(service, uid)

    def broken(rows):
        raise OSError("disk full")

    monkeypatch.setattr(service.store, "upsert_studies", broken)
    from fastapi.testclient import TestClient

    client = TestClient(api.client.app, raise_server_exceptions=False)
    r = client.post("/studies", files={"files": ("s.zip", _zip(new_study, without="SAX"))}, headers=api.write)
    _error(r, 500, "internal")
    monkeypatch.undo()
    after = _study_rows(service, uid)
    for name in before:  # the same rows, down to their write stamps
        assert after[name] == before[name], name
    assert service.searcher.has_study(uid)
    assert len(api.client.get(f"/studies/{uid}", headers=api.read).json()["views"]) == len(before["clips"])


@pytest.mark.parametrize("persist", [False])
def test_uploads_need_the_write_role(api, new_study, persist):
    _error(_upload(api, _zip(new_study), persist=persist, headers=api.read), 403, "forbidden")


def test_scratch_a_crashed_server_left_is_removed_when_the_service_starts(trained_store, tmp_path):

    root = tmp_path / "store"
    copy_store(trained_store[0], root)
    dead = root / "tmp" / "upload-999999999-deadbeef"  # no such process: a server killed mid-upload
    (dead / "files").mkdir(parents=True)
    (dead / "files" / "f00000.dcm").write_bytes(b"\0" * 1024)
    mine = root / "tmp" / "upload-1-cafe"  # pid 1 is alive: another process's upload in progress
    mine.mkdir()
    from api_data import open_api

    handle = open_api(root, trained_store[1])
    with handle.client:  # the lifespan warms the service
        assert not dead.exists() and mine.exists()


def test_an_upload_whose_client_left_stops_at_the_next_stage_and_stores_nothing(private_api, new_study):
    from cmr_search.api.errors import Cancelled

    api, uid = private_api, _study_uid(new_study)
    svc = api.client.app.state.service
    asked = []

    def cancelled() -> bool:  # the client leaves once the files are unpacked
        asked.append(1)
        return True

    with pytest.raises(Cancelled, match="nothing stored"):
        svc.upload([("study.zip", io.BytesIO(_zip(new_study)))], True, cancelled)
    assert asked == [1] and _clip_count(api, uid) == 0 and not list((api.root / "tmp").glob("upload-*"))


def test_the_upload_route_notices_a_client_that_closed_the_connection():
    import asyncio
    import threading

    from starlette.requests import Request

    from cmr_search.api.routes.studies import _watch_disconnect

    async def watch() -> threading.Event:
        channel: asyncio.Queue = asyncio.Queue()  # the ASGI server's side of one connection
        request = Request({"type": "http", "method": "POST", "path": "/studies", "headers": []}, channel.get)
        gone = threading.Event()
        task = asyncio.create_task(_watch_disconnect(request, gone, every_s=0.01))
        await asyncio.sleep(0.05)
        assert not gone.is_set()  # the client is still there
        await channel.put({"type": "http.disconnect"})
        await asyncio.wait_for(task, 5)
        return gone

    assert asyncio.run(watch()).is_set()
