"""Where each study came from (the ``sources`` table): the row a file ingest writes, first and
last seen, display names without credentials, and a store from before the table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cmr_search.store import ClipStore
from cmr_search.store.sources import SOURCE_SCHEMA, SOURCES_TABLE, Origin, Sources, archive_url


def test_a_file_ingest_records_each_study_as_files(ingested):
    store, report = ingested
    uids = store.study_uids()
    rows = store.db.open_table(SOURCES_TABLE).to_arrow().to_pylist()
    assert report.studies_written == len(uids) == len(rows) and {r["study_uid"] for r in rows} == uids
    row = Sources(store).of(min(uids))
    assert row["kind"] == "files" and row["archive"] == "files" and row["first_seen"] <= row["last_seen"]
    # the table holds only these columns: no patient identifier has a place in it
    assert store.db.open_table(SOURCES_TABLE).schema.names == SOURCE_SCHEMA.names
    assert not {"patient_key", "patient_id", "patient_name"} & set(SOURCE_SCHEMA.names)


def test_first_seen_stays_while_the_archive_does_and_restarts_with_another(tmp_path):
    store = ClipStore.open(tmp_path / "s", create=True)
    sources = Sources(store)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    sources.record(["1.2.3", "1.2.4"], Origin.dicomweb("http://pacs:8042/dicom-web"), t0)
    sources.record(["1.2.3"], Origin.dicomweb("http://pacs:8042/dicom-web/"), t0 + timedelta(days=1))
    row = sources.of("1.2.3")
    assert (row["first_seen"], row["last_seen"]) == (t0, t0 + timedelta(days=1))
    sources.record(["1.2.4"], Origin.push("SCANNER1"), t0 + timedelta(days=2))
    row = sources.of("1.2.4")
    assert row["archive"] == "DICOM push from AE SCANNER1" and row["kind"] == "dicom-push"
    assert row["first_seen"] == row["last_seen"] == t0 + timedelta(days=2)
    assert store.db.open_table(SOURCES_TABLE).count_rows() == 2  # one row per study


def test_a_store_from_before_the_table_knows_no_source(tmp_path):
    store = ClipStore.open(tmp_path / "s", create=True)
    assert not store.has_table(SOURCES_TABLE) and Sources(store).of("1.2.3") is None


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:s3cret@pacs.example.org:8443/dicom-web/?access_token=tok#frag", "https://pacs.example.org:8443/dicom-web"),
    ("http://orthanc:8042/dicom-web", "http://orthanc:8042/dicom-web"),
    ("http://[::1]:8042/wado", "http://[::1]:8042/wado"),
])
def test_a_dicomweb_archive_is_named_without_credentials(url, shown):
    assert archive_url(url) == shown == Origin.dicomweb(url).archive


def test_origins_are_checked():
    assert Origin.files("").archive == "files" and Origin.files("Leeds").archive == "Leeds"
    assert Origin.push(None).archive == "DICOM push from AE unknown"
    with pytest.raises(ValueError, match="not one of"):
        Origin("ftp", "x")
