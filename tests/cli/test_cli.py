"""The `cmr` entry point: commands in pipeline order, `synth` writes a cohort."""

from __future__ import annotations

import json
import subprocess
import sys

CMR = [sys.executable, "-m", "cmr_search.cli"]


def test_help_lists_commands_in_pipeline_order():
    out = subprocess.run([*CMR, "--help"], capture_output=True, text=True, check=False, env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0
    names = [line.strip("│ ").split()[0] for line in out.stdout.splitlines() if line.startswith("│ ") and "--" not in line]
    # commands in pipeline order, then the command groups (typer lists groups last)
    assert names == ["synth", "ingest", "train-encoder", "embed", "search", "delete", "eval", "serve", "keys", "demo", "heads"]


def test_synth_writes_dicom_and_tables(tmp_path):
    out = subprocess.run([*CMR, "synth", "--studies", "1", "--out", str(tmp_path / "c"), "--seed", "5", "--workers", "1", "--json"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["n_studies"] == 1 and summary["n_files"] > 100
    for name in ("reports.csv", "labels.csv", "truth.csv"):
        assert (tmp_path / "c" / name).stat().st_size > 0
    assert any((tmp_path / "c" / "dicom").rglob("*.dcm"))
