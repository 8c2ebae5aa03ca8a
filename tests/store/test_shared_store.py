"""Several machines sharing one store on object storage (moto standing in for S3): two state
folders on one bucket and prefix play two machines. The second joins the first's store; both
key a patient alike; a withdrawal on one keeps the study out of the other's ingest and caches;
concurrent tombstones survive; the write lease never has two holders; a commit that a
withdrawal overtook is withdrawn again; an object store without conditional writes is refused."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import lancedb
import pydicom
import pytest
from cli_runner import cmr

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout
from cmr_search.core.location import store_root
from cmr_search.ingest import IngestConfig
from cmr_search.ingest.pipeline import ingest_into
from cmr_search.store import ClipStore
from cmr_search.store.clip_store import sql_quote
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.journal import Journal
from cmr_search.store.lease import Lease
from cmr_search.store.patients import patient_salt
from cmr_search.store.shared import SharedState, shared_state
from cmr_search.store.sources import Origin, Sources
from cmr_search.store.tombstones import Tombstones, tombstone
from cmr_search.store.withdrawal import finish_pending_withdrawals, forget_withdrawn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def env(s3):
    """The test server's environment for the module (no configured salt: each store's own)."""
    with pytest.MonkeyPatch.context() as mp:
        s3.apply_env(mp)
        for name in ("CMR_STORE", "CMR_PATIENT_SALT", "CMR_STATE_DIR"):
            mp.delenv(name, raising=False)
        yield mp


def _folders_by_study(dicom) -> dict[str, object]:
    """study_uid -> its folder of the cohort."""
    return {pydicom.dcmread(next(f.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID: f
            for f in sorted(dicom.iterdir())}


@pytest.fixture(scope="module")
def machines(s3, env, cohort, tmp_path_factory):
    """Machine A ingests studies 0-4 into a new store, machine B (its own state folder) joins
    it and ingests studies 3-7: (uri, A's root, B's root, B's report, folders by study_uid)."""
    uri = s3.uri(s3.new_bucket(), "archive/shared")
    a, b = (store_root(uri, tmp_path_factory.mktemp(name)) for name in ("machine-a", "machine-b"))
    folders = sorted((cohort / "dicom").iterdir())
    ingest_into(folders[:5], a, IngestConfig(workers=2), progress=False)
    report = ingest_into(folders[3:8], b, IngestConfig(workers=2), progress=False)
    return SimpleNamespace(uri=uri, a=a, b=b, report=report, folders=_folders_by_study(cohort / "dicom"))


def _clips_of(store: ClipStore, uid: str) -> int:
    return store.clips.count_rows(f"study_uid = '{sql_quote(uid)}'")


def test_a_second_machine_joins_the_store_and_keys_patients_alike(machines):
    a, b = ClipStore.open(machines.a), ClipStore.open(machines.b)
    assert StoreLayout(machines.b).meta.read_text() == StoreLayout(machines.a).meta.read_text()
    assert StoreLayout(machines.b).patient_salt.read_text() == StoreLayout(machines.a).patient_salt.read_text()
    assert a.study_uids() == b.study_uids() and len(a.study_uids()) > 5
    # studies 3 and 4 came again from B: same rows, the patient key too, so none changed
    assert machines.report.clips_unchanged > 0 and machines.report.clips_updated == 0
    keys = a.clip_metadata(["study_uid", "patient_key"]).to_pylist()
    assert len({(r["study_uid"], r["patient_key"]) for r in keys}) == len(a.study_uids())


def test_a_withdrawal_on_one_machine_holds_on_the_other(machines, monkeypatch):
    b = ClipStore.open(machines.b)
    uid = min(b.study_uids())
    rows = b.clips.search().where(f"study_uid = '{sql_quote(uid)}'").select(["clip_id"]).limit(1).to_list()
    cache = StoreLayout(machines.b).study_cache(uid)
    cache.mkdir(parents=True)
    (cache / f"cine-{rows[0]['clip_id']}.webp").write_bytes(b"RIFF")  # B served a cine of it
    forget_withdrawn(StoreLayout(machines.b))  # B has seen the tombstones as they are

    monkeypatch.setenv("CMR_STATE_DIR", str(machines.a))  # `cmr delete` on machine A
    report = json.loads(cmr("delete", "--store", machines.uri, "--study", uid, "--json"))
    assert report["rows_deleted"]["clips"] > 0 and _clips_of(b, uid) == 0

    assert forget_withdrawn(StoreLayout(machines.b)) and not cache.exists()  # B notices, drops its copy
    assert not forget_withdrawn(StoreLayout(machines.b))  # once
    assert not [p for p in machines.b.rglob("*") if p.is_file() and uid.encode() in p.read_bytes()]
    again = ingest_into([machines.folders[uid]], machines.b, IngestConfig(workers=1), progress=False)
    assert again.studies_written == 0 and {s["study_uid"] for s in again.skipped} == {uid}
    assert _clips_of(b, uid) == 0 and Sources(b).of(uid) is None


def test_withdrawals_from_two_machines_at_once_both_hold(machines):
    la, lb = StoreLayout(machines.a), StoreLayout(machines.b)

    def withdraw(args):
        layout, i = args
        Tombstones(layout).add([f"1.2.999.{i}"])

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(withdraw, [(la if i % 2 else lb, i) for i in range(12)]))
    assert Tombstones(la).withdrawn([f"1.2.999.{i}" for i in range(12)]) == {f"1.2.999.{i}" for i in range(12)}
    assert Tombstones(lb).remove([f"1.2.999.{i}" for i in range(12)]) == 12
    assert not Tombstones(la).withdrawn([f"1.2.999.{i}" for i in range(12)])


def test_a_commit_overtaken_by_a_withdrawal_is_withdrawn_again(machines):
    """A's lease ran out before its commit: B withdrew two studies in between (tombstones
    written, no rows yet to delete). A's commits (an upsert, and fragments recorded as the
    cluster ingest does) are checked after the fact: the studies' rows leave again at once,
    and the rest of the withdrawal (history, indexes) is journaled for any machine to finish."""
    a = ClipStore.open(machines.a)
    by_study, by_patient = sorted(a.study_uids())[:2]
    rows = {u: a.clips.search().where(f"study_uid = '{sql_quote(u)}'").limit(None).to_list()
            for u in (by_study, by_patient)}
    patient = rows[by_patient][0]["patient_key"]
    tombs_b = Tombstones(StoreLayout(machines.b))
    tombs_b.add([by_study])
    tombs_b.add(["1.2.999.other-study-of-that-patient"], {"1.2.999.other-study-of-that-patient": patient})
    with a.write_lock():  # the writer checked the tombstones before B's withdrawal, so commits now
        a.upsert_clips([dict(r, series_description="again") for r in rows[by_study]])
        a.clips.delete(f"study_uid = '{sql_quote(by_patient)}'")
        version = a.clips.version
        a.append_clip_fragments(a.write_clip_fragments(rows[by_patient]), version)
        Sources(a).record([by_patient], Origin.files())
        assert _clips_of(a, by_study) > 0 and _clips_of(a, by_patient) > 0
    assert _clips_of(a, by_study) == 0 and _clips_of(a, by_patient) == 0
    assert Sources(a).of(by_study) is None and Sources(a).of(by_patient) is None
    lines = Tombstones(StoreLayout(machines.a)).lines()
    assert tombstone("study", by_study) in lines and tombstone("patient", patient) in lines
    assert len(Journal(StoreLayout(machines.b)).names()) == 1
    done = finish_pending_withdrawals(EmbeddingStore.open(machines.b))
    assert [sorted(r.study_uids) for r in done] == [sorted([by_study, by_patient])]
    assert not Journal(StoreLayout(machines.a)).names()


def test_a_machine_finishes_the_withdrawal_another_was_killed_in(machines):
    a = ClipStore.open(machines.a)
    uid = min(a.study_uids())
    journal = Journal(StoreLayout(machines.a))
    journal.add({"study_uids": [uid], "patient_of": {}, "purge": False})  # A died after this
    reports = finish_pending_withdrawals(EmbeddingStore.open(machines.b))
    assert [r.study_uids for r in reports] == [[uid]] and _clips_of(a, uid) == 0
    assert not journal.names() and Tombstones(StoreLayout(machines.a)).withdrawn([uid]) == {uid}


# -- the lease ------------------------------------------------------------------------------
@pytest.fixture
def shared(s3, env):
    return SharedState(s3.uri(s3.new_bucket(), "lease"))


def test_two_holders_never_overlap(shared):
    inside, most, done = [0], [0], []
    guard = threading.Lock()

    def work(n: int) -> None:
        for _ in range(n):
            lease = Lease(shared, "locks/test", ttl_s=5)
            lease.acquire(timeout=60)
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.01)
            with guard:
                inside[0] -= 1
                done.append(1)
            lease.release()

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(work, [4, 4, 4]))
    assert most[0] == 1 and len(done) == 12 and shared.get("locks/test") is None


def test_a_stale_lease_is_taken_over_and_a_live_one_is_not(shared):
    shared.put("locks/test", json.dumps({"owner": "gone:1:x", "expires": time.time() + 60}).encode())
    lease = Lease(shared, "locks/test", ttl_s=0.6)
    assert not lease.try_acquire()
    shared.put("locks/test", json.dumps({"owner": "gone:1:x", "expires": time.time() - 1}).encode())
    assert lease.try_acquire() and lease.holder() == lease.owner
    time.sleep(1.0)  # longer than its life: the heartbeat kept it
    assert not Lease(shared, "locks/test", ttl_s=0.6).try_acquire()
    lease.release()
    assert shared.get("locks/test") is None


def test_release_removes_only_our_own_lease(shared):
    lease = Lease(shared, "locks/test", ttl_s=5)
    lease.acquire(timeout=10)
    other = json.dumps({"owner": "other:2:y", "expires": time.time() + 60}).encode()
    shared.put("locks/test", other)  # taken over while this holder was paused
    assert not lease.renew() and lease.lost
    lease.release()
    assert shared.get("locks/test").data == other


def test_the_study_write_lock_holds_the_lease_while_held(machines):
    a, b = ClipStore.open(machines.a), ClipStore.open(machines.b)
    key = StoreLayout(machines.a).key(StoreLayout(machines.a).study_write_lock)
    state = shared_state(StoreLayout(machines.a))
    entered = threading.Event()
    with a.write_lock():
        with a.write_lock():  # re-entrant
            assert state.get(key) is not None
        assert state.get(key) is not None
        worker = threading.Thread(target=lambda: (b.write_lock().acquire(), entered.set(), b.write_lock().release()))
        worker.start()
        assert not entered.wait(1.0)  # machine B waits for A's lease
    worker.join(30)
    assert entered.is_set() and state.get(key) is None


MACHINE = """
import sys, time
from cmr_search.core.location import store_root
from cmr_search.store import ClipStore
from cmr_search.store.shared import shared_state
uri, state, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = ClipStore.open(store_root(uri, state))
counter = shared_state(store.layout)
for _ in range(rounds):
    with store.write_lock():  # a read-modify-write that only the lock keeps whole
        blob = counter.get("test/counter")
        time.sleep(0.02)
        counter.put("test/counter", str(int(blob.data) + 1 if blob else 1).encode())
"""


def test_machines_in_their_own_processes_take_the_write_lock_in_turn(machines, tmp_path):
    """Three processes with three state folders (so three local file locks: only the lease
    on the bucket stands between them) each add 1 to a shared counter 6 times under the
    store's write lock: no increment is lost."""
    import os
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", MACHINE, machines.uri, str(tmp_path / f"machine-{i}"), "6"],
                              env=dict(os.environ), stderr=subprocess.PIPE, text=True) for i in range(3)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stderr.read()[-2000:]
    state = shared_state(StoreLayout(machines.a))
    assert int(state.get("test/counter").data) == 18
    assert state.get(StoreLayout(machines.a).key(StoreLayout(machines.a).study_write_lock)) is None


# -- refusals ---------------------------------------------------------------------------------
def test_an_object_store_without_conditional_writes_is_refused(s3, env, tmp_path, monkeypatch):
    monkeypatch.setattr(SharedState, "conditional_writes_work", lambda self: False)  # fault injection
    uri = s3.uri(s3.new_bucket(), "p")
    with pytest.raises(StoreError, match="ignores conditional writes.*AWS S3"):
        ClipStore.open(store_root(uri, tmp_path / "state"), create=True)


def test_tables_without_a_shared_store_json_are_refused_to_a_new_state_folder(s3, env, tmp_path):
    uri = s3.uri(s3.new_bucket(), "old")
    lancedb.connect(f"{uri}/lance").create_table("clips", data=[{"clip_id": "c"}])  # an older cmr's store
    with pytest.raises(StoreError, match="older cmr made it"):
        ClipStore.open(store_root(uri, tmp_path / "state"), create=True)


def test_a_store_of_an_older_cmr_is_shared_by_its_own_machine(s3, env, tmp_path):
    uri = s3.uri(s3.new_bucket(), "older")
    mine = store_root(uri, tmp_path / "mine")
    ClipStore.open(mine, create=True).clips.count_rows()  # makes the clip table
    layout, state = StoreLayout(mine), shared_state(StoreLayout(mine))
    layout.patient_salt.parent.mkdir(parents=True, exist_ok=True)
    layout.patient_salt.write_text("older-salt")
    layout.tombstones.write_text(tombstone("study", "1.2.3") + "\n")
    layout.journal.mkdir()
    (layout.journal / "withdraw-0.json").write_text('{"study_uids": ["1.2.3"], "purge": true}')  # interrupted
    for folder, files in ((layout.encoder("abc123"), {"config.json": "{}", "model.safetensors": "w"}),
                          (layout.heads / "lvef", {"card.json": '{"name": "lvef"}', "model.safetensors": "h"})):
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    layout.default.write_text("abc123\n")
    for key in state.list():  # as an older cmr left it: nothing shared beside the tables
        state.delete(key)
    with pytest.raises(StoreError, match="older cmr made it"):
        ClipStore.open(store_root(uri, tmp_path / "other"), create=True)
    ClipStore.open(mine)  # its own machine shares its state
    joined = ClipStore.open(store_root(uri, tmp_path / "other"), create=True)
    assert Tombstones(joined.layout).withdrawn(["1.2.3", "1.2.4"]) == {"1.2.3"}
    assert patient_salt(joined.layout) == b"older-salt" and Journal(joined.layout).names() == ["withdraw-0.json"]
    shared = set(state.list())  # its models, their pointer and its heads too, for the machines that join
    assert {"encoders/abc123/config.json", "encoders/abc123/model.safetensors", "encoders/DEFAULT",
            "heads/lvef/head.json"} <= shared
