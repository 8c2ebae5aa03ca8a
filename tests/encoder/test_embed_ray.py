"""``cmr embed --ray``: the cluster path against the single-machine path on the same store, on
real Ray clusters (started by the command, one node, two nodes on this machine), with an
encoder actor SIGKILLed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from ray_cluster import one_node, two_nodes
from store_data import copy_store
from tiny_models import tiny_encoder_config
from typer.testing import CliRunner

from cmr_search.core.exceptions import StoreError
from cmr_search.encoder import embed_store
from cmr_search.encoder.cluster import encoder_pool
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FLOATS = ("vector", "attention")


@pytest.fixture(scope="module")
def model(ingested, tmp_path_factory):
    """A 1-step tiny encoder of the ingested store: (store with nothing embedded, checkpoint)."""
    from cmr_search.encoder.train import Trainer

    store, _ = ingested
    root = copy_store(store.root, tmp_path_factory.mktemp("embed_ray") / "store")
    trained = Trainer(root, tiny_encoder_config(), run_dir=tmp_path_factory.mktemp("run"), progress=False,
                      log=lambda *_: None).fit(max_steps=1)
    return root, trained.checkpoint


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The single-machine path's report and rows on a copy of the store."""
    root, checkpoint = model
    dst = copy_store(root, tmp_path_factory.mktemp("single") / "store")
    report = embed_store(dst, checkpoint, progress=False)
    return report, _rows(dst, report.model_id)


def _rows(root, model_id: str) -> dict[str, dict]:
    tables = EmbeddingStore(ClipStore.open(root))
    out = {}
    for table, key in (("views", "clip_id"), ("studies", "study_uid")):
        data = tables.rows(table, model_id)
        # rev is random per commit, embedded_at its time
        rows = data.drop_columns([c for c in ("rev", "embedded_at") if c in data.column_names]).to_pylist()
        out[table] = {r[key]: r for r in rows}
        assert len(out[table]) == len(rows), f"a {table} key twice"
    return out


def _same_rows(got: dict, want: dict) -> None:
    for table in ("views", "studies"):
        assert got[table].keys() == want[table].keys(), f"{table}: rows missing or extra"
        for key, w in want[table].items():
            g = got[table][key]
            assert g.keys() == w.keys()
            assert {k: g[k] for k in g if k not in FLOATS} == {k: w[k] for k in w if k not in FLOATS}, key
            for k in FLOATS:
                if k in w:
                    assert np.allclose(g[k], w[k], atol=1e-5), (table, key, k)


def _embed_on_cluster(model, tmp_path, **options):
    root, checkpoint = model
    dst = copy_store(root, tmp_path / "store")
    report = embed_store(dst, checkpoint, progress=False, ray="auto", **options)
    return dst, report


def test_cli_embed_ray_local_starts_a_cluster_and_writes_the_single_machine_rows(model, reference, tmp_path):
    from cmr_search.cli.app import app

    root, checkpoint = model
    dst = copy_store(root, tmp_path / "store")
    out = CliRunner().invoke(app, ["embed", "--store", str(dst), "--checkpoint", str(checkpoint), "--ray", "local",
                                   "--batch-size", "8", "--json"])
    assert out.exit_code == 0, out.output
    report, want = reference
    got = json.loads(out.stdout)
    assert {k: got[k] for k in ("model_id", "clips_embedded", "clips_skipped", "studies", "default_model")} == \
        {k: getattr(report, k) for k in ("model_id", "clips_embedded", "clips_skipped", "studies", "default_model")}
    _same_rows(_rows(dst, report.model_id), want)
    import ray

    assert not ray.is_initialized(), "the cluster `local` started is stopped at the end"


def test_two_nodes_write_the_single_machine_rows(model, reference, tmp_path):
    with two_nodes():
        dst, report = _embed_on_cluster(model, tmp_path, batch_size=4, commit_every=8)
    want_report, want = reference
    assert (report.clips_embedded, report.studies) == (want_report.clips_embedded, want_report.studies)
    _same_rows(_rows(dst, report.model_id), want)


def test_two_nodes_embed_a_store_on_object_storage(model, reference, cohort, salt, tmp_path, monkeypatch):
    """The actors read clips from the bucket by row id and the driver commits the rows there:
    the rows of the single-machine path on the same files."""
    from s3 import s3_server

    from cmr_search.core.location import store_root
    from cmr_search.ingest import IngestConfig, ingest

    with s3_server() as s3:
        s3.apply_env(monkeypatch)  # before the nodes start: each node's processes read the credentials
        # the nodes' own state folder, not the driver's: they join the store and fetch the model from the bucket
        monkeypatch.setenv("CMR_STATE_DIR", str(tmp_path / "nodes"))
        root = store_root(s3.uri(s3.new_bucket(), "registry/embed"), tmp_path / "state")
        ingest([cohort / "dicom"], ClipStore.open(root, create=True), IngestConfig(workers=2), salt, progress=False)
        with two_nodes():
            report = embed_store(root, model[1], progress=False, ray="auto", batch_size=4, commit_every=8)
        want_report, want = reference
        assert (report.clips_embedded, report.studies) == (want_report.clips_embedded, want_report.studies)
        _same_rows(_rows(root, report.model_id), want)
        assert not (tmp_path / "state" / "lance").exists(), "the tables are in the bucket only"
        assert (tmp_path / "nodes" / "encoders" / report.model_id / "config.json").exists(), \
            "the actors used their own copy of the model, from the bucket"


def _encoders(ray, job: str | None = None) -> list[dict]:
    """The encoder actors of a job (default: this one), from the GCS (the state API needs the
    dashboard, which the test clusters leave out); each with ``Pid``, ``State``, ``NumRestarts``."""
    from ray._private.state import actors

    job = job or ray.get_runtime_context().get_job_id()
    return [a for a in actors().values() if a["ActorClassName"] == "ClipEncoder" and (a["JobID"] == job or job == "*")]


def test_one_node_with_an_actor_killed_mid_run_loses_and_repeats_no_row(model, reference, tmp_path):
    killed = []
    with one_node(2) as ray:
        def kill_an_actor(what: str) -> None:
            # at the first commit the actors still hold queued batches (two each), so the one
            # killed dies with work in flight, which Ray must run again on its restart
            if what == "views" and not killed:
                alive = [a for a in _encoders(ray) if a["State"] == "ALIVE"]
                os.kill(alive[0]["Pid"], signal.SIGKILL)
                killed.append(alive[0]["ActorID"])

        dst, report = _embed_on_cluster(model, tmp_path, batch_size=2, commit_every=2, before_commit=kill_an_actor)
        restarts = {a["ActorID"]: a["NumRestarts"] for a in _encoders(ray)}
        again = embed_store(dst, model[1], progress=False, ray="auto")
        assert ray.is_initialized(), "a joined cluster stays up"
        # an actor whose constructor fails (here: no model at the path) is not restarted
        with (encoder_pool("auto", dst, tmp_path / "not-on-this-node", "cpu", 2) as encode,
              pytest.raises(StoreError, match="every node must have cmr-search installed and reach the store")):
            list(encode(SimpleNamespace(version=1), [{"_rowid": 0}]))
    assert killed and restarts[killed[0]] >= 1, "the killed actor was restarted"
    want_report, want = reference
    assert report.clips_embedded == want_report.clips_embedded
    _same_rows(_rows(dst, report.model_id), want)  # one row per clip and study, none missing
    assert again.clips_embedded == 0 and again.clips_skipped == report.clips_embedded


def test_a_driver_killed_mid_run_leaves_its_commits_and_a_rerun_completes_the_store(model, reference, tmp_path):
    root, checkpoint = model
    dst = copy_store(root, tmp_path / "store")
    want_report, want = reference
    with one_node(2) as ray:
        args = [sys.executable, "-m", "cmr_search.cli", "embed", "--store", str(dst), "--checkpoint", str(checkpoint),
                "--batch-size", "2", "--ray", ray.get_runtime_context().gcs_address]
        log = tmp_path / "driver.log"  # a file, not a pipe nobody drains while the driver runs
        with log.open("wb") as err:
            driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        # its actors alive: the model is loaded and the batches are out, the commit not made
        while not [a for a in _encoders(ray, "*") if a["State"] == "ALIVE"] and driver.poll() is None:
            assert time.monotonic() < deadline, "the driver started no encoder"
            time.sleep(0.1)
        driver.kill()
        driver.wait()
        assert driver.returncode == -signal.SIGKILL, log.read_text()[-2000:]
        left = _rows(dst, want_report.model_id)  # whole commits only: no key twice, none foreign
        assert left["views"].keys() <= want["views"].keys() and not left["studies"]
        report = embed_store(dst, checkpoint, progress=False, ray="auto")
    assert report.clips_embedded + report.clips_skipped == want_report.clips_embedded
    _same_rows(_rows(dst, report.model_id), want)
