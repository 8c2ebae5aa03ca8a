"""`cmr keys` and `cmr serve` for real: a key made on the command line opens a server of two
uvicorn worker processes; a study uploaded through one worker is found through either."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from store_data import copy_store

CMR = [sys.executable, "-m", "cmr_search.cli"]


def _cmr(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CMR, *args], check=False, capture_output=True, text=True, timeout=120, **kw)


def test_keys_command_line(trained_store, tmp_path):
    root = tmp_path / "store"
    copy_store(trained_store[0], root)
    made = _cmr("keys", "create", "--store", str(root), "--role", "write", "--label", "ci")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("cmr_") and key not in (root / "secrets" / "api_keys.json").read_text()
    listed = json.loads(_cmr("keys", "list", "--store", str(root), "--json").stdout)
    record = next(r for r in listed if r["label"] == "ci")
    assert record["role"] == "write" and key not in json.dumps(listed)
    bad = _cmr("keys", "create", "--store", str(root), "--role", "admin")
    assert bad.returncode == 2 and "read, write" in bad.stderr
    assert _cmr("keys", "revoke", record["key_id"], "--store", str(root)).returncode == 0
    assert record["key_id"] not in _cmr("keys", "list", "--store", str(root), "--json").stdout
    assert _cmr("keys", "revoke", "nope", "--store", str(root)).returncode == 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served(trained_store, tmp_path):
    root = tmp_path / "store"
    copy_store(trained_store[0], root)
    key = _cmr("keys", "create", "--store", str(root), "--role", "write").stdout.strip()
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMR_")}
    proc = subprocess.Popen([*CMR, "serve", "--store", str(root), "--port", str(port), "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"cmr serve did not become ready: {proc.stderr.read()[-3000:]}")
        time.sleep(0.3)
    yield base, {"Authorization": f"Bearer {key}"}, proc
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*.dcm")):
            archive.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def test_serve_with_two_workers_sees_one_store(served, new_study):
    base, auth, proc = served
    with httpx.Client(base_url=base, headers=auth, timeout=60) as client:
        assert client.get("/heads").status_code == 200
        assert httpx.get(base + "/heads").status_code == 401  # keys are on by default
        up = client.post("/studies", files={"files": ("s.zip", _zip(new_study))})
        assert up.status_code == 200, up.text
        uid = up.json()["study_uid"]
        for _ in range(12):  # the OS spreads these over both workers; each must know the study
            r = client.get(f"/studies/{uid}/neighbors", params={"k": 3})
            assert r.status_code == 200, r.text
        assert client.delete(f"/studies/{uid}").status_code == 200
        for _ in range(12):
            assert client.get(f"/studies/{uid}/neighbors").status_code == 404
    assert proc.poll() is None


def _heads_count(text: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith("cmr_requests_total{") and 'route="/heads"' in ln
                and 'status="200"' in ln)
    return float(line.rsplit(" ", 1)[1])


def test_metrics_count_the_requests_of_every_worker(served):
    base, auth, _ = served
    for _ in range(10):  # each on a new connection, which the kernel deals to either worker
        assert httpx.get(base + "/heads", headers=auth).status_code == 200
    scrapes = [httpx.get(base + "/metrics", headers=auth) for _ in range(8)]
    assert all(r.status_code == 200 for r in scrapes)
    assert [_heads_count(r.text) for r in scrapes] == [10.0] * 8  # the sum, whichever worker answers
    assert 'cmr_index_rows{table="studies"}' in scrapes[0].text


def test_serve_refuses_a_viewer_template_with_another_placeholder_before_starting(tmp_path):
    env = {**os.environ, "CMR_VIEWER_URL": "https://viewer/viewer?StudyInstanceUIDs={study_uid}&pid={patient_id}"}
    out = _cmr("serve", "--store", str(tmp_path / "store"), "--no-auth", env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "viewer_url" in out.stderr and "{patient_id}" in out.stderr and "only the placeholder" in out.stderr
