"""``cmr ingest --dicomweb URL``: studies pulled from a PACS over DICOMweb into the same
pipeline that files go through.

A QIDO-RS search lists the studies (``dicomweb_server.find_studies``: MR by default, from
``since``, any other filters); each study is retrieved by WADO-RS in its stored transfer
syntax, its instances written unparsed into one zip (stored, not compressed) in the study's
folder under the store's scratch. As each study arrives the process pool scans it with the
pipeline's own steps (``units.scan_unit``, ``pipeline.plan_studies``, ``units.build_study``,
``pipeline.commit_studies``), so grouping, views, patient keys, idempotence and the report's
reasons are those of a file ingest; a few built studies are committed together and their
folders are deleted. Downloads go on in a few threads meanwhile; the disk never holds more
than ``PullConfig.studies_on_disk`` studies. A study that fails to download is retried with
backoff, then reported (rejected, with the
reason) while the rest goes on. No credential reaches a log line, the report or the store.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from cmr_search.core.progress import progress_bar
from cmr_search.ingest.config import IngestConfig
from cmr_search.ingest.dicomweb_server import (
    DicomWebSource,
    PullConfig,
    Refused,
    Retry,
    StudyRef,
    client_for,
    find_studies,
    list_all,
    parse_query,
    parse_since,
    problem,
    source_from_env,
    study_query,
)
from cmr_search.ingest.discover import FileRef, discover, open_bytes
from cmr_search.ingest.headers import Rejection
from cmr_search.ingest.pipeline import (
    add_phase,
    check_tables,
    commit_studies,
    finish_ingest,
    plan_studies,
)
from cmr_search.ingest.report import IngestReport
from cmr_search.ingest.units import UnitResult, build_study, scan_unit, units_of
from cmr_search.ingest.workers import worker_pool
from cmr_search.store.patients import patient_salt

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from dicomweb_client.api import DICOMwebClient
    from pydantic import SecretStr

    from cmr_search.store.clip_store import ClipStore
    from cmr_search.store.sources import Origin

__all__ = ["DicomWebSource", "PullConfig", "StudyRef", "find_studies", "list_all", "parse_query", "parse_since",
           "pull", "pull_into", "source_from_env", "study_query"]

log = logging.getLogger(__name__)

# WADO-RS in the transfer syntax the archive stores ("*"): asked for plain little endian,
# Orthanc left out (without an error) the instances it would not transcode
WHOLE_STUDY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass
class _Download:
    """One study's download: its folder and which SOP instance each file holds, or why it failed."""

    ref: StudyRef
    folder: Path
    files: list[str] = field(default_factory=list)  # the files written
    error: str | None = None
    attempts: int = 0


class _Downloader:
    """WADO-RS retrieval of whole studies into folders, by a few threads, each with its own
    client and session (so the connections are as many as the threads)."""

    def __init__(self, source: DicomWebSource, cfg: PullConfig):
        self.source, self.cfg = source, cfg
        self.local = threading.local()
        self.sessions: list[requests.Session] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _client(self) -> DICOMwebClient:
        if getattr(self.local, "client", None) is None:
            self.local.client, self.local.session = client_for(self.source)
            session = self.local.session
            with self.lock:
                self.sessions.append(session)
        return self.local.client

    def close(self) -> None:
        """Close every thread's session, once the downloads have ended."""
        with self.lock:
            for session in self.sessions:
                session.close()

    def download(self, ref: StudyRef, folder: Path) -> _Download:
        """The study in ``folder``; on a failure that another try may mend, tries again after
        a backoff, up to ``cfg.attempts`` tries."""
        result = _Download(ref, folder)
        for attempt in range(self.cfg.attempts):
            result.attempts = attempt + 1
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            result.files.clear()
            try:
                self._fetch(ref, folder, result.files)
                result.error = None
                return result
            except Exception as err:  # noqa: BLE001 - every failure of one study is reported, the pull goes on
                words, retry = problem(err)
                result.error = words
            if not retry or self.stop.is_set():
                break
            log.info("study %s: %s; trying again (%d of %d)", ref.uid, result.error, attempt + 2, self.cfg.attempts)
            if self.stop.wait(self.cfg.backoff_s * 2**attempt):
                break
        shutil.rmtree(folder, ignore_errors=True)
        return result

    def _fetch(self, ref: StudyRef, folder: Path, files: list[str]) -> None:
        """The study by one WADO-RS request, its instances written as received (unparsed) into
        one zip (stored, not compressed), which the pipeline reads as it reads a folder. One
        request per study, not per series: per series, the requests' own cost (Orthanc's
        lookups, the client's header parsing) was a third of the pull's download CPU on both
        sides (measured); the instances need no parsing to be grouped, the pipeline groups them
        by their headers as it does files."""
        # a zip, not a file per instance: creating a file was most of a download's time on a
        # VM's disk (0.1-0.6 ms each)
        path, count = folder / "study.zip", 0
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as study:
            for part in self._instances(ref.uid):
                if self.stop.is_set():
                    raise Refused("pull stopped")
                study.writestr(f"{count:06d}.dcm", part)
                count += 1
        files.append(str(path))
        if not count:
            raise Refused("the server sent no instance of this study (deleted since the search?)")
        if ref.instances is not None and count < ref.instances:
            raise Retry(f"incomplete: {count} of the {ref.instances} instances the search listed")

    def _instances(self, study_uid: str) -> Iterator[bytes]:
        """The study's instances by WADO-RS, in the transfer syntax the archive stores (no
        transcoding), each part's bytes as received: the request is ours, the multipart
        decoding the client's (its streaming decoder, not public API; the Orthanc tests
        exercise it). dicomweb-client's own ``iter_study`` parses every instance into a pydicom
        dataset, most of a download's CPU (5 of 8 s for 20 studies, measured), and the
        pipeline reads each header again anyway."""
        client = self._client()
        response = self.local.session.get(f"{self.source.url}/studies/{study_uid}", headers={"Accept": WHOLE_STUDY},
                                          stream=True, timeout=(min(10.0, self.source.timeout_s), self.source.timeout_s))
        if response.status_code == 404:
            response.close()
            raise Refused("the server has no such study (HTTP 404; deleted since the search?)")
        response.raise_for_status()
        return client._decode_multipart_message(response, stream=True)


def pull(source: DicomWebSource, store: ClipStore, cfg: IngestConfig, pull_cfg: PullConfig, salt: bytes,
         reports: Path | None = None, labels: Path | None = None, progress: bool = True,
         known: Callable[[StudyRef], bool] | None = None, on_commit: Callable[[list[StudyRef]], None] | None = None,
         listed: Callable[[list[StudyRef]], None] | None = None) -> IngestReport:
    """Pull the studies of ``source`` matching ``pull_cfg`` into ``store`` through the ingest
    pipeline; the report is a file ingest's, plus the studies listed and those that failed to
    download (rejected, with the reason). Studies ``known(study)`` says are known (a sync:
    already stored, or downloaded and passed over before) are listed but not downloaded.
    ``listed(studies)`` is told which studies will be downloaded, ``on_commit(studies)``
    which downloaded ones each commit wrote or passed over (a sync's cursor). Raises
    InputError when the search itself fails."""
    t0 = time.perf_counter()
    check_tables(store, reports, labels)
    studies, warnings = find_studies(source, pull_cfg)
    report = IngestReport(studies_listed=len(studies))
    if known is not None:
        studies = [s for s in studies if not known(s)]
        report.studies_known = report.studies_listed - len(studies)
    if listed is not None:
        listed(studies)
    report.phases["search"] = round(time.perf_counter() - t0, 2)
    log.info("DICOMweb search: %d studies", len(studies))
    if not report.studies_listed:
        report.warnings.append(f"no study on the DICOMweb server matched {study_query(pull_cfg)}; "
                               "check --query and --since")
    report.warnings += warnings
    from cmr_search.store.sources import Origin  # lancedb's runtime: not at import (see pipeline)

    origin = Origin.dicomweb(source.url)  # the studies' source rows name the server, never a credential
    work = store.scratch_dir("dicomweb")
    downloader = _Downloader(source, pull_cfg)
    threads = ThreadPoolExecutor(pull_cfg.connections, thread_name_prefix="cmr-dicomweb")
    try:
        # ``workers`` processes scan; this process only downloads (threads), plans and commits.
        # No pool for nothing to pull: a sync's idle cycle would start processes every period.
        with progress_bar(progress) as bar, worker_pool(cfg.workers + 1 if studies else 0) as workers:
            task = bar.add_task("studies pulled", total=len(studies))
            stream = _Stream(store, cfg, pull_cfg, salt, report, origin, workers, downloader, threads, work)
            for done in stream.run(studies):
                if on_commit is not None:
                    on_commit([a.download.ref for a in done if a.download.error is None])
                bar.advance(task, len(done))
    finally:
        downloader.stop.set()  # a failure ends the downloads under way at their next instance
        threads.shutdown(wait=True, cancel_futures=True)
        downloader.close()
        shutil.rmtree(work, ignore_errors=True)
    finish_ingest(store, report, reports, labels, t0)
    return report


@dataclass
class _Arrived:
    """A downloaded study on its way through the pipeline: the scans of its units still
    running, and what they found."""

    download: _Download
    scratch: Path
    scans: int = 0
    headers: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)
    rows: list[list[dict]] = field(default_factory=list)  # its studies' clip rows, once built


class _Stream:
    """The pull as one continuous pipeline. A study's units are scanned by the process pool
    as soon as its download ends, it is planned and built as soon as its last scan ends, and
    it is committed with the next few: no study waits for another's download or scan. (Passes
    of a few studies through ``ingest_files`` left the pool idle at each pass's end, while its
    last study was scanned, planned and written: a study is one unit of a few hundred files.)
    At most ``studies_on_disk`` studies are downloading or on disk at once."""

    def __init__(self, store: ClipStore, cfg: IngestConfig, pull_cfg: PullConfig, salt: bytes, report: IngestReport,
                 origin: Origin, pool: ProcessPoolExecutor, downloader: _Downloader, threads: ThreadPoolExecutor,
                 work: Path):
        self.store, self.cfg, self.pull_cfg, self.salt, self.report = store, cfg, pull_cfg, salt, report
        self.origin, self.pool, self.downloader, self.threads, self.work = origin, pool, downloader, threads, work

    def run(self, studies: list[StudyRef]) -> Iterator[list[_Arrived]]:
        """Pull ``studies``; yields each commit's studies (those that failed to download with
        the next commit's), once committed."""
        todo = deque(enumerate(studies))
        running: dict[Future, tuple[str, _Arrived | None]] = {}
        held, done = 0, []  # studies downloading or on disk; studies ready for the next commit
        while todo or running or done:
            while todo and held < self.pull_cfg.studies_on_disk:
                i, ref = todo.popleft()
                running[self.threads.submit(self.downloader.download, ref, self.work / f"{i:06d}")] = ("download", None)
                held += 1
            if done and (sum(len(a.rows) for a in done) >= self.pull_cfg.studies_per_commit or not running):
                self._commit(done)
                yield done
                done = []
                continue
            t_wait, scanning = time.perf_counter(), any(kind != "download" for kind, _ in running.values())
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            add_phase(self.report, "read" if scanning else "download", t_wait)
            for future in finished:
                kind, arrived = running.pop(future)
                if kind == "download":
                    arrived = self._arrive(future.result(), running)
                else:
                    self._scanned(arrived, future.result())
                if arrived.scans == 0:  # every unit scanned (or the download failed)
                    self._build(arrived)
                    shutil.rmtree(arrived.download.folder, ignore_errors=True)
                    held -= 1
                    done.append(arrived)

    def _arrive(self, download: _Download, running: dict) -> _Arrived:
        """A finished download: its units submitted to the pool (none where it failed)."""
        arrived = _Arrived(download, download.folder / "clips")
        if download.error is not None:
            tries = f" after {download.attempts} tries" if download.attempts > 1 else ""
            log.warning("study %s not downloaded%s: %s", download.ref.uid, tries, download.error)
            self.report.rejected.append(asdict(Rejection(
                f"study {download.ref.uid}", f"not downloaded from the DICOMweb server{tries}: {download.error}",
                study_uid=download.ref.uid)))
            return arrived
        arrived.scratch.mkdir()
        refs = discover([Path(f) for f in download.files])
        self.report.files_found += len(refs)
        for unit in units_of(refs, max_files=self.cfg.max_files_per_unit):
            future = self.pool.submit(scan_unit, unit, self.salt, self.cfg, arrived.scratch)
            running[future] = ("scan", arrived)
            arrived.scans += 1
        return arrived

    def _scanned(self, arrived: _Arrived, result: UnitResult) -> None:
        arrived.scans -= 1
        arrived.headers += result.headers
        arrived.failures.update(result.failures)
        self.report.files_read += len(result.headers)
        for r in result.rejections:
            entry = self._named(asdict(r), arrived)
            (self.report.skipped if r.by_design else self.report.rejected).append(entry)

    def _build(self, arrived: _Arrived) -> None:
        """Plan and build a scanned study (its clips were cut in the scan; a series split at
        a unit's edge is read again here), rejections named by study and instance."""
        if not arrived.headers:
            return
        t0 = time.perf_counter()
        start = len(self.report.skipped), len(self.report.rejected)
        for plan in plan_studies(arrived.headers, self.cfg, self.report):
            rows, failed = build_study(plan, self.cfg, arrived.scratch, arrived.failures)
            self.report.rejected += [asdict(r) for r in failed]
            if rows:
                arrived.rows.append(rows)
        for entries, first in ((self.report.skipped, start[0]), (self.report.rejected, start[1])):
            for entry in entries[first:]:
                self._named(entry, arrived)
        add_phase(self.report, "write", t0)

    def _named(self, entry: dict, arrived: _Arrived) -> dict:
        _name_instance(entry, {path: arrived.download.ref.uid for path in arrived.download.files})
        return entry

    def _commit(self, done: list[_Arrived]) -> None:
        t0 = time.perf_counter()
        studies = [rows for a in done for rows in a.rows]
        if studies:
            commit_studies(self.store, studies, self.report, self.origin)
        add_phase(self.report, "write", t0)


def _name_instance(entry: dict, study_of: dict[str, str]) -> None:
    """A report entry about a downloaded instance (a member of a study's zip) names its study
    and SOP instance (read now, while the zip is there), not a scratch path that is gone once
    the pass ends."""
    import pydicom

    path, _, member = entry["where"].partition("::")
    if path not in study_of:
        return
    try:
        with open_bytes(FileRef(path, member or None)) as data:
            sop = str(pydicom.dcmread(data, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:  # noqa: BLE001 - an unreadable instance is why some entries exist
        sop = "unreadable"
    entry["where"] = f"study {study_of[path]}, instance {sop}"


def pull_into(source: DicomWebSource, root: Path, cfg: IngestConfig, pull_cfg: PullConfig,
              configured_salt: SecretStr | str | None = None, reports: Path | None = None, labels: Path | None = None,
              progress: bool = True) -> IngestReport:
    """``pull`` into the store at ``root`` (created if new), patients keyed with the configured
    salt, else the store's own: what ``cmr ingest --dicomweb`` runs. A store this call creates
    is removed again when the pull fails (an unreachable server, refused credentials)."""
    from cmr_search.store.clip_store import ClipStore

    root = Path(root)
    made = [p for p in (root, *root.parents) if not p.exists()]
    try:
        store = ClipStore.open(root, cfg.clip, create=True)
        salt = patient_salt(store.layout, configured_salt)
        return pull(source, store, cfg, pull_cfg, salt, reports=reports, labels=labels, progress=progress)
    except BaseException:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        raise
