"""``cmr ingest --ray``: the cluster path against the process-pool path on the same cohort,
on a real Ray cluster (one node, and two nodes on this machine), with a worker killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from ray_cluster import kill_a_worker, one_node, two_nodes

from cmr_search.ingest import IngestConfig, IngestReport, ingest
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.withdrawal import withdraw

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rows(store: ClipStore, table: str, key: str) -> list[dict]:
    data = store.db.open_table(table).to_arrow().sort_by(key)
    return data.drop_columns([c for c in ("ingested_at", "imported_at") if c in data.column_names]).to_pylist()


def _same_store(store: ClipStore, report, disk: ClipStore, disk_report) -> None:
    assert report.exit_code == disk_report.exit_code
    assert report.studies_written == disk_report.studies_written == 10
    assert (report.files_found, report.files_read, report.studies_found) == \
        (disk_report.files_found, disk_report.files_read, disk_report.studies_found)
    assert report.views == disk_report.views and report.clips_inserted == disk_report.clips_inserted
    got, want = _rows(store, "clips", "clip_id"), _rows(disk, "clips", "clip_id")
    assert [r["clip_id"] for r in got] == [r["clip_id"] for r in want]  # no clip lost, none twice
    for g, w in zip(got, want, strict=True):  # every column, the pixel bytes included
        assert g == w, {k: (g[k], w[k]) for k in g if k != "clip" and g[k] != w[k]} or "clip pixels differ"
    for table in ("reports", "labels"):
        assert _rows(store, table, "study_uid") == _rows(disk, table, "study_uid")
    assert sorted((s["where"], s["reason"]) for s in report.skipped) == \
        sorted((s["where"], s["reason"]) for s in disk_report.skipped)
    assert sorted(r["reason"] for r in report.rejected) == sorted(r["reason"] for r in disk_report.rejected)


def _ingest(cohort, root, salt, ray="auto"):
    store = ClipStore.open(root, create=True)
    report = ingest([cohort / "dicom"], store, IngestConfig(workers=2, ray=ray), salt,
                    reports=cohort / "reports.csv", labels=cohort / "labels.csv", progress=False)
    return store, report


def test_the_cluster_ingest_is_the_process_pool_ingest_and_commits_once(cohort, ingested, salt, tmp_path):
    disk, disk_report = ingested
    with one_node(2):
        store, report = _ingest(cohort, tmp_path / "ray", salt)
        _same_store(store, report, disk, disk_report)
        versions = store.clips.list_versions()
        assert len(versions) == 2, "the clip table: created, then one commit of the whole run"
        assert sorted(r["study_uid"] for r in _rows(store, "sources", "study_uid")) == sorted(store.study_uids())
        again = ingest([cohort / "dicom"], store, IngestConfig(workers=2, ray="auto"), salt, progress=False)
    assert again.clips_inserted == again.clips_updated == 0
    assert again.clips_unchanged == report.clips_inserted, "ingesting the same files again writes nothing"
    assert len(_rows(store, "clips", "clip_id")) == report.clips_inserted
    gone = min(store.study_uids())
    withdraw(EmbeddingStore(store, 8), [gone])
    with one_node(2):
        after = ingest([cohort / "dicom"], store, IngestConfig(workers=2, ray="auto"), salt, progress=False)
    assert gone not in store.study_uids(), "a withdrawn study never comes back"
    assert [s["where"] for s in after.skipped if "withdrawn" in s["reason"]] == [f"study {gone}"]


def test_two_nodes_make_the_same_store(cohort, ingested, salt, tmp_path):
    disk, disk_report = ingested
    with two_nodes():
        import ray

        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        store, report = _ingest(cohort, tmp_path / "ray2", salt)
    _same_store(store, report, disk, disk_report)


def test_two_nodes_write_a_store_on_object_storage(cohort, ingested, salt, tmp_path, monkeypatch):
    """The nodes write their fragments straight into the bucket (no file system shared with
    the driver) and the driver commits them once: the same store as the process pool's."""
    from s3 import s3_server

    from cmr_search.core.location import store_root

    disk, disk_report = ingested
    with s3_server() as s3:
        s3.apply_env(monkeypatch)  # before the nodes start: each node's processes read the credentials
        monkeypatch.setenv("CMR_STATE_DIR", str(tmp_path / "state"))
        uri = s3.uri(s3.new_bucket(), "registry/ray")
        with two_nodes():
            store, report = _ingest(cohort, store_root(uri, tmp_path / "state"), salt)
        _same_store(store, report, disk, disk_report)
        assert len(store.clips.list_versions()) == 2, "created, then one commit of the whole run"
        bucket = uri.split("/")[2]
        fragments = s3.keys("registry/ray/lance/clips.lance/data/", bucket=bucket)
        assert fragments and not (tmp_path / "state" / "lance").exists(), "the tables are in the bucket only"


def test_a_worker_killed_mid_run_loses_and_doubles_nothing(cohort, ingested, salt, tmp_path):
    disk, disk_report = ingested
    killed: list[str] = []
    with one_node(2):
        stop = threading.Event()

        def killer():
            while not stop.is_set() and not killed:
                for name in ("_build_task", "_scan_task"):
                    if kill_a_worker(name):
                        killed.append(name)
                        break
                time.sleep(0.05)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            store, report = _ingest(cohort, tmp_path / "killed", salt)
        finally:
            stop.set()
            thread.join()
    assert killed, "no task was running to kill"
    _same_store(store, report, disk, disk_report)


def test_a_driver_killed_before_its_commit_leaves_the_store_as_it_was_and_a_rerun_completes_it(
        cohort, ingested, salt, tmp_path):
    disk, disk_report = ingested
    root = tmp_path / "store"
    env = {**os.environ, "CMR_PATIENT_SALT": salt.decode(), "COLUMNS": "200"}
    with one_node(2) as ray:
        address = ray.get_runtime_context().gcs_address  # the driver joins this cluster, which outlives it
        args = [sys.executable, "-m", "cmr_search.cli", "ingest", str(cohort / "dicom"), "--store", str(root),
                "--ray", address]
        driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        data = root / "lance" / "clips.lance" / "data"
        deadline = time.monotonic() + 120
        while driver.poll() is None and not (data.exists() and any(data.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert driver.poll() is None, f"the driver ended before a fragment was written: {driver.stderr.read()[-2000:]}"
        driver.kill()  # fragments on disk, none committed
        driver.wait()
        store = ClipStore.open(root)
        assert store.clips.count_rows() == 0 and len(store.clips.list_versions()) == 1
        rerun = subprocess.run([*args, "--reports", str(cohort / "reports.csv"), "--labels", str(cohort / "labels.csv"),
                                "--json"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == disk_report.exit_code, rerun.stderr[-2000:]
    report = IngestReport(**{k: v for k, v in json.loads(rerun.stdout.splitlines()[0]).items()
                             if k in IngestReport.__dataclass_fields__})
    _same_store(ClipStore.open(root), report, disk, disk_report)


def test_an_address_nothing_answers_at_fails_at_once_with_what_to_do(cohort, tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cmr_search.cli", "ingest", str(cohort / "dicom"), "--store",
                          str(tmp_path / "s"), "--ray", "127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                         check=False, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2 and "nothing answers at the Ray address '127.0.0.1:1'" in out.stderr, out.stderr
    assert "ray start --head" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 60 and not (tmp_path / "s").exists()
