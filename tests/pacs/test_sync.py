"""``cmr sync``: a store kept in step with a real Orthanc over DICOMweb picks up only the
studies it does not hold (and embeds them), moves its cursor only past what is stored,
and a sync killed with SIGKILL then restarted leaves no gap and no duplicate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from orthanc import remove, start_orthanc
from pydantic import SecretStr

from cmr_search.encoder.registry import EncoderRegistry
from cmr_search.ingest.dicomweb import DicomWebSource, PullConfig
from cmr_search.pacs.sync import Syncer, archive_name
from cmr_search.store.clip_store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore

CMR = [sys.executable, "-m", "cmr_search.cli"]


@pytest.fixture(scope="module")
def cohort_studies(cohort) -> list[tuple[str, str, list[Path]]]:
    """The session cohort's studies, oldest first: (StudyDate, StudyInstanceUID, files)."""
    files, dates = defaultdict(list), {}
    for path in sorted((cohort / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "StudyDate"])
        files[str(ds.StudyInstanceUID)].append(path)
        dates[str(ds.StudyInstanceUID)] = str(ds.get("StudyDate", ""))
    return sorted((dates[u], u, f) for u, f in files.items())


@pytest.fixture()
def archive(tmp_path):
    """An empty Orthanc of this test's own."""
    server = start_orthanc(tmp_path / "orthanc")
    try:
        yield server
    finally:
        remove(server)


@pytest.fixture()
def empty_store(trained_store, tmp_path):
    """A new store holding no study, with the session's trained encoder as its default."""
    root, model_id = trained_store
    new = tmp_path / "store"
    ClipStore.open(new, ClipStore.open(root).clip_config, create=True)
    registry = EncoderRegistry(new)
    registry.register(root / "encoders" / model_id)
    registry.set_default(model_id)
    return new, model_id


def _source(server) -> DicomWebSource:
    user, password = server.auth
    return DicomWebSource(server.dicomweb, username=user, password=SecretStr(password), password_env="PACS_PW")


def test_a_sync_takes_only_what_is_new_and_makes_it_searchable(archive, empty_store, cohort_studies, salt):
    root, model_id = empty_store
    late, older, newer = cohort_studies[0], cohort_studies[2:6], cohort_studies[6:9]
    archive.upload([f for _, _, files in older for f in files])
    syncer = Syncer(root, _source(archive), PullConfig(), salt.decode())
    first = syncer.once()
    assert (first.listed, first.studies_written, first.already_stored) == (4, 4, 0)
    assert first.model_id == model_id and first.clips_embedded > 0 and first.cursor == older[-1][0]
    assert EmbeddingStore.open(root).count("studies", model_id) == 4
    archive.upload([f for _, _, files in newer for f in files])
    second = syncer.once()
    # the search starts a week behind the cursor: what it lists again is skipped, not downloaded
    assert second.studies_written == 3 and second.already_stored >= 1 and second.cursor == newer[-1][0]
    assert EmbeddingStore.open(root).count("studies", model_id) == 7
    state = syncer.state()
    assert state.cycles == 2 and state.studies_added == 7 and state.last_error is None
    assert state.archive == archive_name(archive.dicomweb) and archive.auth[1] not in syncer.state_path.read_text()
    # a study that reaches the archive dated long before the cursor (a backfill) lies behind
    # the lookback: --full finds it, still downloading nothing it already has
    cursor = datetime.strptime(state.cursor, "%Y%m%d")
    assert datetime.strptime(late[0], "%Y%m%d") < cursor - timedelta(days=syncer.lookback_days)
    archive.upload(late[2])
    assert syncer.once().studies_written == 0
    full = syncer.once(full=True)
    assert full.studies_written == 1 and full.already_stored == 7


def test_a_run_loop_syncs_until_stopped_and_reports_a_failed_cycle(archive, empty_store, cohort_studies, salt):
    root, _ = empty_store
    archive.upload(cohort_studies[0][2])
    cycles, errors = [], []
    syncer = Syncer(root, _source(archive), PullConfig(), salt.decode())
    stop = threading.Event()
    thread = threading.Thread(target=syncer.run, args=(0.2, stop), kwargs={"on_cycle": cycles.append,
                                                                         "on_error": errors.append})
    thread.start()
    deadline = time.monotonic() + 60
    while len(cycles) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    archive.stop()  # the archive goes away: the next cycles fail, the loop goes on
    while not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(30)
    assert [c.studies_written for c in cycles[:2]] == [1, 0] and errors
    assert "unreachable" in syncer.state().last_error or "reach" in syncer.state().last_error


def test_a_killed_sync_restarts_without_gap_or_duplicate(archive, empty_store, cohort_studies, salt):
    root, model_id = empty_store
    archive.upload([f for _, _, files in cohort_studies for f in files])
    user, password = archive.auth
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "CMR_PATIENT_SALT": salt.decode(), "PACS_PW": password}
    args = [*CMR, "sync", "--once", "--dicomweb", archive.dicomweb, "--store", str(root), "--user", user,
            "--password-env", "PACS_PW"]
    state_files = root / "sync"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while not any(state_files.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first pass has committed: its cursor was saved
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored_after_kill = ClipStore.open(root).study_uids() if ClipStore.open(root).has_table("clips") else set()
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # what the killed run committed is not downloaded again: the rest is
    assert report["listed"] - report["already_stored"] == len(cohort_studies) - len(stored_after_kill)
    clips = ClipStore.open(root).clips.to_arrow()
    assert set(clips["study_uid"].to_pylist()) == {u for _, u, _ in cohort_studies}  # no gap
    assert len(set(clips["clip_id"].to_pylist())) == clips.num_rows  # no duplicate
    assert EmbeddingStore.open(root).count("studies", model_id) == len(cohort_studies)
    assert password not in done.stdout + done.stderr


def test_a_study_passed_over_is_not_downloaded_again_until_it_grows(archive, empty_store, cohort_studies, salt,
                                                                   tmp_path):
    """An MR study with no cine (a brain or knee MR of the same archive) is downloaded once and
    passed over; later cycles do not download it again, unless the archive lists more of
    its instances (series that came late)."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    root, _ = empty_store
    studies = cohort_studies[2:4]
    archive.upload([f for _, _, files in studies for f in files])
    other = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    other.StudyInstanceUID, other.StudyDate = generate_uid(), studies[-1][0]  # dated within the sync's window
    first_file = tmp_path / "other-1.dcm"
    other.save_as(first_file)
    archive.upload([first_file])
    syncer = Syncer(root, _source(archive), PullConfig(), salt.decode())
    first = syncer.once()
    assert (first.listed, first.studies_written, first.already_stored) == (3, 2, 0)
    assert len(syncer.state().passed_over) == 1  # skipped: no cine series
    second = syncer.once()
    # (the search starts a week behind the cursor: the older cohort study may fall out of it)
    assert second.studies_written == 0 and second.already_stored == second.listed >= 2
    assert other.StudyInstanceUID not in syncer.state_path.read_text(), "a hash of it is kept, not its UID"
    other.SOPInstanceUID = generate_uid()  # one more instance of the same study reaches the archive
    other.save_as(tmp_path / "other-2.dcm")
    archive.upload([tmp_path / "other-2.dcm"])
    third = syncer.once()
    assert third.studies_written == 0 and third.already_stored == third.listed - 1, "downloaded again: it grew"
    assert list(syncer.state().passed_over.values()) == [[2, studies[-1][0]]]
    full = syncer.once(full=True)  # every study not stored, the passed-over one too
    assert full.studies_written == 0 and full.already_stored == full.listed - 1
    assert ClipStore.open(root).study_uids() == {u for _, u, _ in studies}
