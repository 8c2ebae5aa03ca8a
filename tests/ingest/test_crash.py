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
