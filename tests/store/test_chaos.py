"""One chaos round (the long campaign is benchmarks/chaos.py --rounds 200): concurrent
ingest, embed, replace and delete on one store, some killed with SIGKILL, then every
invariant of the store checked (views per clip, pooled clips, withdrawn studies nowhere,
FAISS equal to the tables, search answering)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"


def test_a_chaos_round_leaves_every_invariant_holding(cohort, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "2", "--seed", "5", "--data",
                           str(cohort / "dicom"), "--work", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 invariant violations" in done.stdout
