"""A real Orthanc PACS for the tests: started on free loopback ports with its own
configuration and storage in a temporary folder, its DICOMweb plugin on, HTTP basic
authentication required, DICOM files uploaded through its REST API, stopped at the end.
Its own module name: `conftest` is ambiguous across test folders.

Debian's packages `orthanc` and `orthanc-dicomweb` provide it (`.ci/run` installs them);
where either is missing, `orthanc_or_skip` says so and the tests that need it skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ORTHANC = Path("/usr/sbin/Orthanc")
#: where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`)
PLUGIN_PLACES = (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"), Path("/usr/lib/orthanc"))
USER = "cmr-test"
PASSWORD = "pacs-secret-7f3a9c"  # a distinctive value: the leak tests look for it everywhere


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library, or None where orthanc-dicomweb is missing."""
    for place in PLUGIN_PLACES:
        if place.is_file():
            return place
        if place.is_dir():
            found = sorted(place.glob("libOrthancDicomWeb.so*"))
            if found:
                return found[-1]
    return None


def orthanc_or_skip() -> Path:
    """The DICOMweb plugin's path; skips the test where Orthanc or the plugin is missing."""
    if not ORTHANC.exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)")
    plugin = dicomweb_plugin()
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    return plugin


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(data: Path, http_port: int, dicom_port: int, plugin: Path) -> dict:
    """Orthanc's configuration: its files and index in ``data``, loopback only, basic auth,
    DICOMweb, and what slows start-up or uploads turned off (fsync per file, compression,
    job saving)."""
    return {
        "Name": "cmr-test-pacs",
        "StorageDirectory": str(data / "storage"),
        "IndexDirectory": str(data / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "CMRTEST",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                     "Host": f"127.0.0.1:{http_port}", "Ssl": False},
        "SyncStorageArea": False,
        "StorageCompression": False,
        "HttpCompressionEnabled": False,
        "SaveJobs": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "MetricsEnabled": False,
        "HttpThreadsCount": 8,
        "DicomThreadsCount": 1,
        "ConcurrentJobs": 1,
        "StableAge": 3600,  # no stable-study events (and their work) during a test
    }


@dataclass
class Orthanc:
    """A running Orthanc: its DICOMweb root, REST root, credentials, log file and process."""

    http_port: int
    dicom_port: int
    folder: Path  # configuration and log
    data: Path  # storage and index (the same folder, or one in /dev/shm)
    process: subprocess.Popen
    log: Path
    uploaded: list[str] = field(default_factory=list)  # Orthanc ids of the uploaded instances

    @property
    def url(self) -> str:
        """The REST API's root."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root, as a client is given it."""
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        """The test user's (name, password)."""
        return USER, PASSWORD

    def upload(self, files: Iterable[Path], threads: int = 2) -> int:
        """POST each DICOM file to ``/instances``; how many were stored. Two connections at
        once keep Orthanc busy while this process reads the next file (more were no faster)."""
        files = list(files)
        local, sessions = threading.local(), []

        def post(path: Path) -> str:
            if not hasattr(local, "session"):
                local.session = _session(self.auth)
                sessions.append(local.session)
            response = local.session.post(f"{self.url}/instances", data=path.read_bytes(),
                                          headers={"Content-Type": "application/dicom"}, timeout=30)
            response.raise_for_status()
            return response.json()["ID"]

        try:
            with ThreadPoolExecutor(threads) as pool:
                ids = list(pool.map(post, files))
        finally:
            for session in sessions:
                session.close()
        self.uploaded += ids
        return len(ids)

    def stop(self) -> None:
        """Kill the server: its files are thrown away, and a graceful stop takes Orthanc ~5 s."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _session(auth: tuple[str, str]) -> requests.Session:
    session = requests.Session()
    session.auth = auth
    return session


def start_orthanc(folder: Path, timeout_s: float = 30.0) -> Orthanc:
    """Start Orthanc with a fresh database (its configuration and log in ``folder``) and wait
    until its REST API and its DICOMweb plugin answer. Skips where Orthanc or the plugin is
    missing."""
    plugin = orthanc_or_skip()
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    data = _server_folder(folder)
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config(data, http_port, dicom_port, plugin), indent=1))
    log = folder / "orthanc.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([*_die_with_parent(), str(ORTHANC), str(cfg)], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder)
    server = Orthanc(http_port, dicom_port, folder, data, process, log)
    deadline = time.monotonic() + timeout_s
    with _session(server.auth) as session:
        while True:
            if process.poll() is not None:
                shutil.rmtree(data, ignore_errors=True)
                raise RuntimeError(f"Orthanc exited with code {process.returncode} at start:\n{_tail(log)}")
            try:
                # the plugin's root answers only once the plugin is loaded, after the REST API
                if session.get(f"{server.dicomweb}/studies", timeout=2).status_code == 200:
                    return server
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                shutil.rmtree(data, ignore_errors=True)
                raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s:\n{_tail(log)}")
            time.sleep(0.05)


def _die_with_parent() -> list[str]:
    """A command prefix that has Linux send Orthanc SIGTERM when the test process dies, so a
    killed test run leaves no server behind (util-linux's setpriv; elsewhere nothing)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def _server_folder(fallback: Path) -> Path:
    """Where the server keeps its files and index: in memory (/dev/shm) where it has room,
    since writing each instance to disk made uploads 40-70 % slower here; else ``fallback``.
    The folder's name holds this process's id, so that the next run removes what a killed
    one left in memory."""
    shm = Path("/dev/shm")
    try:
        roomy = shutil.disk_usage(shm).free > 4 * 2**30 and os.access(shm, os.W_OK)
    except OSError:
        roomy = False
    if not roomy:
        return fallback
    for old in shm.glob("cmr-orthanc-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"cmr-orthanc-{os.getpid()}-", dir=shm))


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def remove(server: Orthanc) -> None:
    """Stop the server and delete its database and files."""
    server.stop()
    shutil.rmtree(server.data, ignore_errors=True)
    shutil.rmtree(server.folder, ignore_errors=True)
