"""``cmr listen``: studies pushed by C-STORE from a pynetdicom client end up ingested,
embedded and searchable; only the SOP classes ingestion can use are accepted; a calling AE
title outside the allowed ones is turned away; the listener survives a bad batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from store_data import copy_store

from cmr_search.core.exceptions import InputError
from cmr_search.pacs.arrival import ingest_and_embed
from cmr_search.pacs.listener import (
    ENHANCED_MR_STORAGE,
    MR_STORAGE,
    ListenConfig,
    StudyListener,
    calling_ae,
)
from cmr_search.store.clip_store import ClipStore
from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.search import Searcher
from cmr_search.store.sources import Sources

CMR = [sys.executable, "-m", "cmr_search.cli"]
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def pushed_study(tmp_path_factory) -> tuple[list[Path], str, str]:
    """One new synthetic study's MR files (not in the test store), its study UID and patient name."""
    from cmr_search.synth import generate_cohort

    out = tmp_path_factory.mktemp("push")
    generate_cohort(1, out, seed=4242, workers=1, progress=False)
    files, uid, name = [], None, None
    for path in sorted((out / "dicom").rglob("*")):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.SOPClassUID in (MR_STORAGE, ENHANCED_MR_STORAGE):
                files.append(path)
                uid, name = str(ds.StudyInstanceUID), str(ds.PatientName)
    return files, uid, name


@pytest.fixture()
def store(trained_store, tmp_path):
    """A private copy of the session's store with a trained encoder."""
    root, model_id = trained_store
    copy_store(root, tmp_path / "store")
    return tmp_path / "store", model_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def push(files: list[Path], port: int, calling: str = "SCANNER", contexts=(MR_STORAGE, ENHANCED_MR_STORAGE)):
    """Send files by C-STORE; the statuses (or None when no association was made)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for sop in contexts:
        ae.add_requested_context(sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5",
                                       "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90"])
    assoc = ae.associate("127.0.0.1", port, ae_title="CMRSEARCH")
    if not assoc.is_established:
        return None
    statuses = []
    for path in files:
        try:
            status = assoc.send_c_store(pydicom.dcmread(path))
            statuses.append(int(status.Status) if status else None)
        except ValueError:  # no accepted presentation context for this SOP class
            statuses.append("no context")
    assoc.release()
    return statuses


def test_a_pushed_study_is_ingested_embedded_and_searchable(store, pushed_study, salt):
    root, model_id = store
    files, study_uid, patient_name = pushed_study
    before = EmbeddingStore.open(root).count("studies", model_id)
    reports = []
    listener = StudyListener(root, ListenConfig(host="127.0.0.1", port=0),
                             lambda folder: reports.append(ingest_and_embed(root, [folder], salt.decode())))
    listener.start()
    try:
        assert push(files, listener.port) == [0x0000] * len(files)
        assert listener.wait_idle(120)
    finally:
        listener.stop()
    assert len(reports) == 1 and reports[0].studies == 1 and reports[0].model_id == model_id
    assert EmbeddingStore.open(root).count("studies", model_id) == before + 1
    hits = Searcher(root, model_id, IndexConfig()).by_study(study_uid, 3)
    assert len(hits) == 3
    assert not any(root.glob("tmp/arrivals/*"))  # the received files are gone once ingested
    source = Sources(ClipStore.open(root)).of(study_uid)  # where it came from: the calling AE of the association
    assert (source["kind"], source["archive"]) == ("dicom-push", "DICOM push from AE SCANNER")
    # the archive's patient name reached no file of the store
    needle = patient_name.encode()
    assert needle and not any(needle in p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_only_usable_sop_classes_and_allowed_callers_are_accepted(store, pushed_study):
    root, _ = store
    files, _, _ = pushed_study
    got = []
    listener = StudyListener(root, ListenConfig(host="127.0.0.1", port=0, calling_ae_titles=("SCANNER",)), got.append)
    listener.start()
    try:
        # a CT-only association: its context is refused, so nothing can be sent
        assert push(files[:1], listener.port, contexts=(CT_STORAGE,)) in (None, ["no context"])
        # a caller that is not on the list is turned away
        assert push(files[:1], listener.port, calling="STRANGER") is None
        assert listener.wait_idle(30)
    finally:
        listener.stop()
    assert got == [] and listener.received == 0


def test_a_failing_batch_is_kept_and_the_listener_goes_on(store, pushed_study):
    root, _ = store
    files, _, _ = pushed_study
    calls = []

    def flaky(folder):
        calls.append(folder)
        if len(calls) == 1:
            raise RuntimeError("disk full")

    listener = StudyListener(root, ListenConfig(host="127.0.0.1", port=0), flaky)
    listener.start()
    try:
        push(files[:2], listener.port)
        assert listener.wait_idle(30)
        push(files[2:4], listener.port)
        assert listener.wait_idle(30)
    finally:
        listener.stop()
    assert listener.failed == 1 and listener.handed_over == 1 and listener.last_error == "RuntimeError"
    assert calls[0].exists() and not calls[1].exists()  # the failed batch waits for the next start


def test_bad_settings_say_what_to_fix(store):
    root, _ = store
    with pytest.raises(InputError, match="AE title"):
        ListenConfig(ae_title="A" * 17)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(InputError, match="--port"):
            StudyListener(root, ListenConfig(host="127.0.0.1", port=busy.getsockname()[1]), print).start()
    finally:
        busy.close()


def test_cmr_listen_ingests_a_push_and_stops_cleanly(store, pushed_study, salt):
    root, model_id = store
    files, study_uid, _ = pushed_study
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "CMR_PATIENT_SALT": salt.decode()}
    proc = subprocess.Popen([*CMR, "listen", "--store", str(root), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        statuses = None
        while statuses is None and time.monotonic() < deadline:
            time.sleep(0.5)
            statuses = push(files, port)
        assert statuses == [0] * len(files)
        line = proc.stdout.readline()  # one JSON line per ingested batch
        report = json.loads(line)
        assert report["studies"] == 1 and report["model_id"] == model_id
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert EmbeddingStore.open(root).get_study(study_uid, model_id) is not None


def test_the_calling_ae_title_is_kept_as_printable_text():
    assert calling_ae(b"SCANNER1  ") == calling_ae("SCANNER1") == "SCANNER1"  # pynetdicom 1 gave bytes
    assert calling_ae("CT\n\x00A") == "CTA" and calling_ae(None) == ""
