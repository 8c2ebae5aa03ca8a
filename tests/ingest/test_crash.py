"""kill -9 in the middle of an ingest leaves every study whole or absent, and a re-run completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

from cmr_search.ingest import IngestConfig, ingest
from cmr_search.store import ClipStore

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cmr_search.ingest import IngestConfig, ingest
    from cmr_search.store import ClipStore
    if __name__ == "__main__":
        store = ClipStore.open(Path(sys.argv[2]), create=True)
        ingest([Path(sys.argv[1])], store, IngestConfig(workers=1, studies_per_commit=1), b"test-salt", progress=False)
    """
)


def _versions(root) -> int:
    folder = root / "lance" / "clips.lance" / "_versions"
    return len(list(folder.glob("*.manifest"))) if folder.exists() else 0


def test_kill_during_ingest_leaves_whole_studies(cohort, ingested, tmp_path, salt):
    reference, _ = ingested
    expected = Counter(reference.clip_metadata(["study_uid"])["study_uid"].to_pylist())
    root = tmp_path / "store"
    script = tmp_path / "run_ingest.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), str(cohort / "dicom"), str(root)], env=env)
    deadline = time.time() + 300
    while _versions(root) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # wait for a couple of study commits, then pull the plug mid-run
    assert proc.poll() is None, "ingest finished before it could be killed; use a bigger cohort"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    store = ClipStore.open(root)
    got = Counter(store.clip_metadata(["study_uid"])["study_uid"].to_pylist())
    assert 0 < len(got) < len(expected)
    for study, n in got.items():
        assert n == expected[study], f"study {study} half written: {n} of {expected[study]} clips"

    report = ingest([cohort / "dicom"], store, IngestConfig(workers=2), salt, progress=False)
    assert report.exit_code == 0
    final = Counter(store.clip_metadata(["study_uid"])["study_uid"].to_pylist())
    assert final == expected
    assert not list((root / "tmp").glob("ingest-*")), "scratch of the killed run was not cleaned"


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fp:
                    if int(fp.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_a_killed_ingest_leaves_no_worker_or_forkserver_running(cohort, tmp_path):
    cmd = [sys.executable, "-m", "cmr_search.cli", "ingest", str(cohort / "dicom"), "--store", str(tmp_path / "s"),
           "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    helpers: set[int] = set()
    while time.time() < deadline and proc.poll() is None:  # the forkserver, and the pool worker it forked
        helpers = _children(proc.pid)
        workers = set().union(*(_children(h) for h in helpers)) if helpers else set()
        if workers:
            helpers |= workers
            break
        time.sleep(0.05)
    assert proc.poll() is None and helpers, "the ingest finished before its workers could be seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in helpers):
        time.sleep(0.2)
    left = [p for p in helpers if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
    assert not left, f"processes of the killed ingest still run: {left}"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fp:
            return fp.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
