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
    assert names == ["synth", "ingest", "listen", "sync", "train-encoder", "embed", "train-text", "encoders", "search", "delete", "eval", "serve", "keys", "demo", "heads"]


def test_synth_writes_dicom_and_tables(tmp_path):
    out = subprocess.run([*CMR, "synth", "--studies", "1", "--out", str(tmp_path / "c"), "--seed", "5", "--workers", "1", "--json"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["n_studies"] == 1 and summary["n_files"] > 100
    for name in ("reports.csv", "labels.csv", "truth.csv"):
        assert (tmp_path / "c" / name).stat().st_size > 0
    assert any((tmp_path / "c" / "dicom").rglob("*.dcm"))


def test_a_file_of_queries_is_answered_in_one_call(trained_store, tmp_path):
    import json
    import os

    root, model_id = trained_store
    file = tmp_path / "queries.txt"
    file.write_text("# paraphrased clinical queries\nseverely dilated left ventricle\n\nno LV thrombus\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "cmr_search.cli", "search", "--store", str(root), "--queries", str(file),
                          "-k", "3"], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [d["query"]["text"] for d in lines] == ["severely dilated left ventricle", "no LV thrombus"]
    assert all(d["model_id"] == model_id and len(d["hits"]) == 3 for d in lines)
    one = subprocess.run([sys.executable, "-m", "cmr_search.cli", "search", "--store", str(root), "--text",
                          "no LV thrombus", "-k", "3", "--json"], capture_output=True, text=True, env=env, check=True)
    assert json.loads(one.stdout)["hits"] == lines[1]["hits"]  # the same answer as one --text call
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    bad = subprocess.run([sys.executable, "-m", "cmr_search.cli", "search", "--store", str(root), "--queries", str(empty)],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2 and "holds no query" in bad.stderr
