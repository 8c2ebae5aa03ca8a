"""``cmr listen``: a DICOM C-STORE SCP (pynetdicom) that an archive or a scanner routes
studies to. Each association's instances are written as they come into their own folder
under ``StoreLayout.arrivals``; when the association ends (released, or aborted: what was
acknowledged is ours to keep), or has been idle for ``quiet_seconds``, the folder is handed
to one worker thread that ingests and embeds it (``arrival.ingest_and_embed``) and removes
it. Only the SOP classes ingestion can use are offered (MR and Enhanced MR images, and
Verification for a C-ECHO); an association proposing only others gets its presentation
contexts rejected, as the standard says. The files hold patient identifiers until they
are ingested; nothing from them is logged but UIDs and counts.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout

__all__ = ["ListenConfig", "StudyListener", "calling_ae"]

log = logging.getLogger(__name__)

#: transfer syntaxes ingestion decodes (pydicom with pylibjpeg: uncompressed, deflate, RLE,
#: JPEG baseline and lossless, JPEG 2000)
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
]
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
VERIFICATION = "1.2.840.10008.1.1"
_UID = re.compile(r"^[0-9.]{1,64}$")

# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


@dataclass
class ListenConfig:
    """Where and how ``cmr listen`` answers."""

    ae_title: str = "CMRSEARCH"
    host: str = "0.0.0.0"  # every interface: scanners and archives are other machines
    port: int = 11112
    calling_ae_titles: tuple[str, ...] = ()  # accept only these callers; empty: any
    quiet_seconds: float = 0.0  # also hand over an open association idle this long (0: only at its end)
    max_pending_gb: float = 20.0  # received and not yet ingested; past it C-STORE answers "out of resources"

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16 or not self.ae_title.isascii() or "\\" in self.ae_title:
            raise InputError(f"AE title {self.ae_title!r} must be 1 to 16 ASCII characters without a backslash")
        if not 0 <= self.port < 65536:  # 0: any free port (the tests)
            raise InputError(f"port {self.port} is not a TCP port (1-65535)")


def calling_ae(title: str | bytes | None) -> str:
    """An association's calling AE title as text (pynetdicom 1 gave bytes), printable ASCII only."""
    if isinstance(title, bytes):
        title = title.decode("ascii", "replace")
    return "".join(c for c in (title or "") if c.isascii() and c.isprintable()).strip()


class StudyListener:
    """The C-STORE SCP of one store and its ingest worker."""

    def __init__(self, store_root: Path, cfg: ListenConfig, on_arrival: Callable[[Path], object]):
        self.root, self.cfg, self.on_arrival = Path(store_root), cfg, on_arrival
        self.folder = StoreLayout(store_root).arrivals
        self._open: dict[int, dict] = {}  # association id -> its folder, last activity, count
        self._lock = threading.Lock()
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._pending_bytes = 0
        self._server = None
        self._worker: threading.Thread | None = None
        self.received = self.handed_over = self.failed = 0
        self.last_error: str | None = None

    # -- the server ---------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (in background threads) and start the worker; folders a previous run left
        behind (it was killed before ingesting them) are ingested first."""
        from pynetdicom import AE, evt

        self.folder.mkdir(parents=True, exist_ok=True)
        for left in sorted(p for p in self.folder.iterdir() if p.is_dir()):
            self._queue.put(left)
        ae = AE(ae_title=self.cfg.ae_title)
        for sop in (MR_STORAGE, ENHANCED_MR_STORAGE):
            ae.add_supported_context(sop, TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        if self.cfg.calling_ae_titles:
            ae.require_calling_aet = list(self.cfg.calling_ae_titles)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda _: SUCCESS),
                    (evt.EVT_RELEASED, self._on_end), (evt.EVT_ABORTED, self._on_end)]
        try:
            self._server = ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers)
        except OSError as error:
            raise InputError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: {error.strerror or error}; "
                             "choose a free port with --port") from None
        self._worker = threading.Thread(target=self._work, name="cmr-listen-ingest", daemon=True)
        self._worker.start()
        log.info("listening as %s on %s:%d", self.cfg.ae_title, self.cfg.host, self.cfg.port)

    @property
    def port(self) -> int:
        """The port it listens on (the one the system chose where the config says 0)."""
        return self._server.server_address[1] if self._server else self.cfg.port

    def stop(self, drain: bool = True) -> None:
        """Stop listening; with ``drain``, hand over open associations and wait until every
        received study is ingested."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self._lock:
            open_now = list(self._open)
        for key in open_now:
            self._hand_over(key)
        self._queue.put(None)
        if self._worker is not None and drain:
            self._worker.join()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until everything received so far is ingested (tests, and a clean exit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._open) or self._pending_bytes > 0
            if not busy and self._queue.unfinished_tasks == 0:
                return True
            self._hand_over_quiet()
            time.sleep(0.05)
        return False

    # -- events -------------------------------------------------------------------------------
    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if not _UID.match(uid):
            return CANNOT_UNDERSTAND  # the file name comes from it: nothing else is written
        key = id(event.assoc)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001 - a dataset pynetdicom cannot re-encode: refuse this one
            return CANNOT_UNDERSTAND
        with self._lock:
            if self._pending_bytes + len(data) > self.cfg.max_pending_gb * 1e9:
                return OUT_OF_RESOURCES
            entry = self._open.get(key)
            if entry is None:
                folder = self.folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{key:x}-{time.monotonic_ns()}"
                folder.mkdir(parents=True)
                # the studies' source once ingested: which AE sent them (kept beside the files,
                # so a folder left by a killed run still names its sender)
                StoreLayout.arrival_caller(folder).write_text(calling_ae(event.assoc.requestor.ae_title))
                entry = self._open[key] = {"folder": folder, "files": 0, "bytes": 0}
            entry["last"] = time.monotonic()
            entry["files"] += 1
            entry["bytes"] += len(data)
            self._pending_bytes += len(data)
            path = entry["folder"] / f"{uid}.dcm"
        try:
            path.write_bytes(data)
        except OSError:
            return OUT_OF_RESOURCES
        self.received += 1
        return SUCCESS

    def _on_end(self, event) -> None:
        self._hand_over(id(event.assoc))

    def _hand_over(self, key: int) -> None:
        with self._lock:
            entry = self._open.pop(key, None)
        if entry is not None:
            self._queue.put(entry["folder"])

    def _hand_over_quiet(self) -> None:
        if not self.cfg.quiet_seconds:
            return
        now = time.monotonic()
        with self._lock:
            idle = [k for k, e in self._open.items() if now - e["last"] >= self.cfg.quiet_seconds]
        for key in idle:  # later instances of the association start a folder of their own
            self._hand_over(key)

    # -- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                folder = self._queue.get(timeout=max(0.5, self.cfg.quiet_seconds / 4 or 0.5))
            except queue.Empty:
                self._hand_over_quiet()
                continue
            try:
                if folder is None:
                    return
                self._ingest(folder)
            finally:
                self._queue.task_done()

    def _ingest(self, folder: Path) -> None:
        size = sum(p.stat().st_size for p in folder.glob("*.dcm"))
        try:
            if any(folder.glob("*.dcm")):
                self.on_arrival(folder)
            self.handed_over += 1
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the listener
            # the files stay for the next start to try again; only the error's kind is logged
            self.failed += 1
            self.last_error = type(error).__name__
            log.error("ingesting a received batch failed (%s); its files are kept for the next start",
                      type(error).__name__)
            return
        finally:
            with self._lock:
                self._pending_bytes = max(0, self._pending_bytes - size)
        shutil.rmtree(folder, ignore_errors=True)
