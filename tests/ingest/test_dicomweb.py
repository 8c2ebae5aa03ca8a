"""Pulling studies from a PACS over DICOMweb (a real Orthanc holding the session's cohort):
the same clips as a file ingest, the search filters, the failures in words, retries, and no
patient identifier or credential anywhere it could be kept."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from datetime import date
from pathlib import Path

import pydicom
import pytest
import requests
from orthanc import PASSWORD, USER, free_port
from pydantic import SecretStr

from cmr_search.core.exceptions import InputError
from cmr_search.ingest import IngestConfig, dicomweb
from cmr_search.ingest.dicomweb import (
    DicomWebSource,
    PullConfig,
    StudyRef,
    find_studies,
    list_all,
    parse_query,
    parse_since,
    pull,
    source_from_env,
    study_query,
)
from cmr_search.store import ClipStore

CMR = [sys.executable, "-m", "cmr_search.cli"]
TOKEN = "tok-3b1e6f0d2a9c47e8"  # distinctive, so a leak is found by a plain search


def _source(pacs, password: str = PASSWORD) -> DicomWebSource:
    return DicomWebSource(pacs.dicomweb, username=USER, password=SecretStr(password), password_env="PACS_PW")


@pytest.fixture(scope="module")
def studies(cohort) -> dict[str, dict]:
    """What the archive knows of each cohort study: its date, accession number and the
    patient identifiers of its files (which must never reach the store)."""
    out: dict[str, dict] = {}
    for series in sorted({p.parent for p in (cohort / "dicom").rglob("*.dcm")}):  # a file per series
        ds = pydicom.dcmread(min(series.glob("*.dcm")), stop_before_pixels=True)
        study = out.setdefault(ds.StudyInstanceUID, {"date": ds.StudyDate, "accession": ds.AccessionNumber, "phi": set()})
        study["phi"] |= {str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)} - {""}
    return out


@pytest.fixture(scope="module")
def pulled(pacs, cohort, salt, tmp_path_factory):
    """The whole cohort pulled into a fresh store (the file ingest's settings and salt, small
    bounds so that several passes run), with every log line of the pull and the peak number
    of study folders on disk: (store, report, log text, peak)."""
    root = tmp_path_factory.mktemp("pulled")
    store = ClipStore.open(root, create=True)
    cfg = PullConfig(connections=2, studies_on_disk=3, studies_per_commit=2)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger()
    level = logger.level
    on_disk: list[int] = []
    download = dicomweb._Downloader.download

    def counted(self, ref, folder):
        on_disk.append(1 + sum(p.is_dir() for p in folder.parent.iterdir()))  # this one and those already there
        return download(self, ref, folder)

    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # urllib3 and dicomweb-client included: the request lines too
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dicomweb._Downloader, "download", counted)
            report = pull(_source(pacs), store, IngestConfig(workers=2), cfg, salt,
                          reports=cohort / "reports.csv", labels=cohort / "labels.csv", progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return store, report, stream.getvalue(), max(on_disk)


def _rows(store: ClipStore, table: str, key: str) -> list[dict]:
    data = store.db.open_table(table).to_arrow().sort_by(key)
    return data.drop_columns([c for c in ("ingested_at", "imported_at") if c in data.column_names]).to_pylist()


def test_a_pulled_cohort_is_the_ingested_cohort(pacs, pulled, ingested):
    store, report, _, peak = pulled
    disk, disk_report = ingested
    assert report.exit_code == 0, report.rejected
    assert report.studies_listed == report.studies_written == disk_report.studies_written == 10
    assert report.files_found == disk_report.files_found and report.views == disk_report.views
    got, want = _rows(store, "clips", "clip_id"), _rows(disk, "clips", "clip_id")
    assert [r["clip_id"] for r in got] == [r["clip_id"] for r in want]
    for g, w in zip(got, want, strict=True):  # every column, the pixel bytes included
        assert g == w, {k: (g[k], w[k]) for k in g if k != "clip" and g[k] != w[k]} or "clip pixels differ"
    for table in ("reports", "labels"):
        assert _rows(store, table, "study_uid") == _rows(disk, table, "study_uid")
    assert sorted(s["reason"] for s in report.skipped) == sorted(s["reason"] for s in disk_report.skipped)
    assert peak <= 3, "more studies on disk than PullConfig.studies_on_disk"
    sources = store.db.open_table("sources").to_arrow().to_pylist()  # each study links back to the archive
    assert sorted(r["study_uid"] for r in sources) == sorted(store.study_uids())
    assert {(r["kind"], r["archive"]) for r in sources} == {("dicomweb", pacs.dicomweb.rstrip("/"))}
    assert not list(store.layout.tmp.iterdir()), "the downloads are deleted once ingested"


def test_pulling_again_writes_nothing(pacs, pulled, salt):
    store, _, _, _ = pulled
    latest = max(s["date"] for s in _study_dates(store).values())
    again = pull(_source(pacs), store, IngestConfig(workers=1), PullConfig(since=_iso(latest)), salt, progress=False)
    assert again.studies_listed >= 1 and again.clips_inserted == again.clips_updated == 0 and again.clips_unchanged > 0


def _study_dates(store: ClipStore) -> dict[str, dict]:
    rows = store.clip_metadata(["study_uid", "study_date"]).to_pylist()
    return {r["study_uid"]: {"date": r["study_date"].replace("-", "")} for r in rows}


def _iso(dicom_date: str) -> date:
    return date(int(dicom_date[:4]), int(dicom_date[4:6]), int(dicom_date[6:8]))


def test_since_and_query_filters_pick_only_the_matching_studies(pacs, studies):
    source = _source(pacs)
    dates = sorted({s["date"] for s in studies.values()})
    cut = dates[len(dates) // 2]
    found, warnings = find_studies(source, PullConfig(since=_iso(cut)))
    assert {r.uid for r in found} == {uid for uid, s in studies.items() if s["date"] >= cut} and not warnings
    assert 0 < len(found) < len(studies)
    assert all(r.instances and r.instances > 0 for r in found)  # the count a download is checked against
    uid, one = min(studies.items(), key=lambda kv: kv[0])
    found, _ = find_studies(source, PullConfig(filters=parse_query([f"AccessionNumber={one['accession']}"])))
    assert [r.uid for r in found] == [uid]
    assert find_studies(source, PullConfig(filters=(("ModalitiesInStudy", "CT"),)))[0] == []
    for modality in ("MR", ""):  # Orthanc pages by offset without ModalitiesInStudy, not with it
        everything, _ = find_studies(source, PullConfig(modality=modality, page_size=3))
        assert sorted(r.uid for r in everything) == sorted(studies)


def _server(n: int, honours_offset=True, offset_past_first_page_empty=False):
    """A fake QIDO-RS search over n studies, with the paging faults servers have."""
    items = [{"0020000D": {"Value": [f"1.2.{i}"], "vr": "UI"}, "00201208": {"Value": [i + 1], "vr": "IS"}}
             for i in range(n)]
    calls = []

    def search(limit: int, offset: int) -> list:
        calls.append((limit, offset))
        if not honours_offset:
            offset = 0
        if offset_past_first_page_empty and offset >= limit:
            return []
        return items[offset:offset + limit]

    return search, calls


@pytest.mark.parametrize("n", [0, 2, 3, 7, 9])
def test_every_study_is_listed_whatever_the_server_does_with_the_offset(n):
    for faults in ({}, {"honours_offset": False}, {"offset_past_first_page_empty": True}):
        search, calls = _server(n, **faults)
        listed = list_all(search, page_size=3)
        assert [r.uid for r in listed] == [f"1.2.{i}" for i in range(n)], faults
        assert [r.instances for r in listed] == list(range(1, n + 1))
        assert len(calls) <= 2 + n // 3 + 2, calls  # pages, then at most a few doubling limits
    search, calls = _server(7)
    list_all(search, page_size=3)
    assert calls == [(3, 0), (3, 3), (3, 6)]  # an honest server: offsets only, no second pass


def test_a_filter_orthanc_cannot_read_is_named_when_nothing_matches(pacs):
    found, warnings = find_studies(_source(pacs), PullConfig(filters=(("StudyDescription", "CARDIAC MRI"),)))
    assert found == [] and "StudyDescription" in warnings[0] and "percent-encoded" in warnings[0]


def test_the_command_line_pulls_what_it_is_asked_for(pacs, studies, tmp_path):
    latest = max(s["date"] for s in studies.values())
    expected = {min(uid for uid, s in studies.items() if s["date"] >= latest)}
    root = tmp_path / "store"
    accession = studies[min(expected)]["accession"]  # plain characters: Orthanc 1.10 decodes no %XX in a query
    out = _cmr(["ingest", "--dicomweb", pacs.dicomweb, "--store", str(root), "--since", str(_iso(latest)),
                "--query", f"AccessionNumber={accession}", "--user", USER, "--password-env", "PACS_PW",
                "--workers", "1", "--json"])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["studies_listed"] == len(expected) and report["studies_written"] == len(expected)
    assert ClipStore.open(root).study_uids() == expected
    _no_secret_or_phi(out.stdout + out.stderr, studies)


def _cmr(args: list[str], password: str = PASSWORD) -> subprocess.CompletedProcess:
    env = {**os.environ, "PACS_PW": password, "PACS_TOKEN": TOKEN, "COLUMNS": "200"}
    return subprocess.run([*CMR, *args], capture_output=True, text=True, env=env, check=False, timeout=300)


def test_wrong_credentials_and_an_unreachable_server_say_what_to_do(pacs, tmp_path):
    with pytest.raises(InputError, match="refused the credentials.*check the user name 'cmr-test' and its password in "
                                         r"\$PACS_PW") as refused:
        find_studies(_source(pacs, password="not-the-password"), PullConfig())
    assert refused.value.__cause__ is None and refused.value.__context__ is None  # no request (headers) chained
    token = source_from_env(pacs.dicomweb, {"PACS_TOKEN": TOKEN}, token_env="PACS_TOKEN")
    with pytest.raises(InputError, match=r"check the bearer token in \$PACS_TOKEN") as refused:
        find_studies(token, PullConfig())
    assert TOKEN not in str(refused.value)
    with pytest.raises(InputError, match="asks for credentials.*--token-env VAR"):
        find_studies(DicomWebSource(pacs.dicomweb), PullConfig())
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(InputError, match="cannot reach the DICOMweb server at .*check the host and port"):
        find_studies(DicomWebSource(dead), PullConfig())
    with pytest.raises(InputError, match="no DICOMweb service at .*give the DICOMweb root"):
        find_studies(DicomWebSource(pacs.url + "/not-dicom-web", username=USER, password=SecretStr(PASSWORD)), PullConfig())
    # through the command line: exit code 2, the message on stderr, no traceback, no store left
    for args, password, message in (
        (["--dicomweb", pacs.dicomweb, "--user", USER, "--password-env", "PACS_PW"], "wrong", "refused the credentials"),
        (["--dicomweb", pacs.dicomweb, "--token-env", "PACS_TOKEN"], PASSWORD, "check the bearer token in $PACS_TOKEN"),
        (["--dicomweb", dead], PASSWORD, "cannot reach the DICOMweb server"),
    ):
        out = _cmr(["ingest", *args, "--store", str(tmp_path / "s")], password=password)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and PASSWORD not in out.stderr + out.stdout and TOKEN not in out.stderr
        assert not (tmp_path / "s").exists()


def test_a_failing_study_is_retried_then_reported_while_the_rest_go_on(pacs, studies, salt, tmp_path, monkeypatch):
    since = sorted(s["date"] for s in studies.values())[-3]  # the three latest studies
    listed = sorted(uid for uid, s in studies.items() if s["date"] >= since)
    flaky, broken = listed[0], listed[-1]
    assert len(listed) >= 3
    tries: dict[str, int] = {}
    fetch = dicomweb._Downloader._fetch

    def failing(self, ref, folder, files):
        tries[ref.uid] = tries.get(ref.uid, 0) + 1
        if ref.uid == broken or (ref.uid == flaky and tries[ref.uid] == 1):
            raise requests.ConnectionError(f"reset by peer while sending to {USER}:{PASSWORD}")  # never shown
        return fetch(self, ref, folder, files)

    search = dicomweb.find_studies
    gone, short = "1.2.826.0.1.3680043.99999", listed[1]

    def listing(source, cfg):  # what the server says, plus a study deleted since and an overstated count
        found, warnings = search(source, cfg)
        found = [StudyRef(r.uid, r.instances + 1) if r.uid == short else r for r in found]
        return [*found, StudyRef(gone, 5)], warnings

    monkeypatch.setattr(dicomweb._Downloader, "_fetch", failing)
    monkeypatch.setattr(dicomweb, "find_studies", listing)
    store = ClipStore.open(tmp_path / "store", create=True)
    report = pull(_source(pacs), store, IngestConfig(workers=1), PullConfig(since=_iso(since), backoff_s=0.01), salt,
                  progress=False)
    assert tries[flaky] == 2 and tries[broken] == 3 and tries[gone] == 1 and tries[short] == 3
    assert store.study_uids() == set(listed) - {broken, short}
    reasons = {r["where"]: r["reason"] for r in report.rejected}
    assert set(reasons) == {f"study {broken}", f"study {gone}", f"study {short}"} and report.exit_code == 3
    prefix = "not downloaded from the DICOMweb server"
    assert reasons[f"study {broken}"] == f"{prefix} after 3 tries: connection failed (refused, reset or host unknown)"
    # not worth another try
    assert reasons[f"study {gone}"] == f"{prefix}: the server has no such study (HTTP 404; deleted since the search?)"
    assert reasons[f"study {short}"].startswith(f"{prefix} after 3 tries: incomplete: ")
    assert not list(store.layout.tmp.iterdir())


def _no_secret_or_phi(text: str, studies: dict[str, dict]) -> None:
    phi = set().union(*(s["phi"] for s in studies.values()))
    found = sorted(v for v in phi | {PASSWORD, TOKEN} if v in text)
    assert not found, f"found {found}"


def test_no_patient_identifier_or_credential_reaches_the_store_the_logs_or_the_report(pulled, studies):
    store, report, logs, _ = pulled
    assert "GET /dicom-web/studies" in logs  # the capture saw the requests themselves
    _no_secret_or_phi(logs, studies)
    _no_secret_or_phi(json.dumps(report.to_dict()), studies)
    phi = set().union(*(s["phi"] for s in studies.values()))
    needles = {v.encode() for v in phi | {PASSWORD, TOKEN}}
    files = [p for p in Path(store.root).rglob("*") if p.is_file()]
    assert any(p.parent == store.layout.ingest_reports for p in files)
    for path in files:
        data = path.read_bytes()
        assert not [n for n in needles if n in data], path


def test_sources_and_queries_are_checked_before_anything_is_asked():
    source = DicomWebSource("https://pacs.example.org/dicom-web/", token=SecretStr(TOKEN))
    assert source.url == "https://pacs.example.org/dicom-web" and TOKEN not in repr(source)
    for url, message in (("pacs.example.org", "not a DICOMweb URL"), ("ftp://pacs/x", "not a DICOMweb URL"),
                         ("https://u:p@pacs.example.org/dicom-web", "carries credentials")):
        with pytest.raises(InputError, match=message):
            DicomWebSource(url)
    with pytest.raises(InputError, match=r"\$PACS_TOKEN holds a line break") as broken:
        source_from_env("https://pacs", {"PACS_TOKEN": TOKEN + "\n"}, token_env="PACS_TOKEN")
    assert TOKEN not in str(broken.value)
    with pytest.raises(InputError, match="PACS_TOKEN .* is not set or empty"):
        source_from_env("https://pacs", {}, token_env="PACS_TOKEN")
    with pytest.raises(InputError, match="both a user name"):
        source_from_env("https://pacs", {}, username="me")
    assert parse_query(["StudyDescription=*HEART*", "00081030=x"]) == (("StudyDescription", "*HEART*"), ("00081030", "x"))
    for bad, message in (("Modalty=MR", "no DICOM keyword"), ("StudyDescription", "not KEY=VALUE"), ("=x", "not KEY=VALUE")):
        with pytest.raises(InputError, match=message):
            parse_query([bad])
    assert parse_since("2024-02-29") == date(2024, 2, 29)
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        parse_since("29/02/2024")
    cfg = PullConfig(since=date(2024, 1, 5), filters=(("InstitutionName", "A*"),))
    assert study_query(cfg) == {"ModalitiesInStudy": "MR", "StudyDate": "20240105-", "InstitutionName": "A*"}
    assert study_query(PullConfig(modality="", filters=(("ModalitiesInStudy", "CT"),))) == {"ModalitiesInStudy": "CT"}
    with pytest.raises(InputError, match="give one of them"):
        study_query(PullConfig(since=date(2024, 1, 5), filters=(("StudyDate", "2024"),)))
    with pytest.raises(InputError, match="studies_on_disk"):
        PullConfig(connections=8, studies_on_disk=4)


def test_the_command_line_wants_exactly_one_source(tmp_path):
    for args, message in ((["ingest", "--store", str(tmp_path)], "exactly one source"),
                          (["ingest", str(tmp_path), "--dicomweb", "http://127.0.0.1:9/dicom-web", "--store", str(tmp_path)],
                           "exactly one source"),
                          (["ingest", str(tmp_path), "--since", "2024-01-01", "--store", str(tmp_path)], "go with --dicomweb"),
                          (["ingest", "--dicomweb", "http://127.0.0.1:9/x", "--since", "May", "--store", str(tmp_path / "s")],
                           "YYYY-MM-DD")):
        out = _cmr(args)
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_without_orthanc_the_server_tests_skip_with_the_reason(monkeypatch, tmp_path):
    import orthanc

    monkeypatch.setattr(orthanc, "ORTHANC", tmp_path / "no-Orthanc")
    with pytest.raises(pytest.skip.Exception, match="apt-get install orthanc orthanc-dicomweb"):
        orthanc.start_orthanc(tmp_path / "pacs")


def test_a_report_entry_about_a_downloaded_instance_names_its_study_and_instance(tmp_path):
    from pydicom.data import get_testdata_file

    mr = Path(get_testdata_file("MR_small.dcm"))
    series = tmp_path / "study.zip"
    with zipfile.ZipFile(series, "w") as zf:
        zf.writestr("000000.dcm", mr.read_bytes())
        zf.writestr("000001.dcm", b"not DICOM")
    sop = str(pydicom.dcmread(mr).SOPInstanceUID)
    entries = [{"where": f"{series}::000000.dcm"}, {"where": f"{series}::000001.dcm"}, {"where": "elsewhere.dcm"}]
    for entry in entries:
        dicomweb._name_instance(entry, {str(series): "1.2.3"})
    assert [e["where"] for e in entries] == [f"study 1.2.3, instance {sop}", "study 1.2.3, instance unreadable",
                                              "elsewhere.dcm"]


def test_a_session_takes_the_environments_proxies_and_ca_bundle_once(monkeypatch, tmp_path):
    from cmr_search.ingest.dicomweb_server import client_for

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.example:3128")
    monkeypatch.setenv("NO_PROXY", "pacs.local")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "hospital-ca.pem"))
    _, session = client_for(DicomWebSource("https://pacs.example.org/dicom-web"))
    assert session.proxies["https"] == "http://proxy.hospital.example:3128"
    assert session.verify == str(tmp_path / "hospital-ca.pem") and not session.trust_env
    _, inside = client_for(DicomWebSource("https://pacs.local/dicom-web"))  # NO_PROXY: straight to the archive
    assert "https" not in inside.proxies
    _, unverified = client_for(DicomWebSource("https://pacs.local/dicom-web", verify_tls=False))
    assert unverified.verify is False
