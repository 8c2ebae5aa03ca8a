"""``cmr sync``: keep a store up to date with a DICOMweb archive.

Each cycle searches the archive (QIDO-RS) from the store's cursor on, downloads only the
studies the store does not hold yet (``dicomweb.pull(known=...)``), ingests them as they
arrive, and embeds what was added with the store's default model, so a study in the archive
is searchable after one cycle.

The cursor (``StoreLayout.sync_state``, one file per archive) is a StudyDate: every listed
study dated before it is stored. It moves after each committed pass, and only as far as
the oldest listed study not yet stored, so a sync killed at any point (or a study that
failed to download) leaves no gap: the next cycle lists from the cursor again and skips what
is already stored, which leaves no duplicate either. A study downloaded and not stored (no
cine series: a brain MR of the same archive) is remembered by a
hash of its UID with the instance count the archive listed, and not downloaded again until
the archive lists more instances of it (series that arrived late) or ``--full`` asks for
every study not stored; without that, every cycle would download again every such study of
its search window. A withdrawn study is not remembered (readmitted, it comes back). Each cycle searches ``lookback_days``
(7) behind the cursor, for studies that reach the archive days after their StudyDate; one
older still (a backfill) lies behind it: ``full=True`` (``cmr sync --full``) searches the
whole archive once, still downloading only what is new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from cmr_search.core.exceptions import CmrError
from cmr_search.core.layout import StoreLayout, write_atomic

__all__ = ["SyncReport", "SyncState", "Syncer", "archive_name"]

log = logging.getLogger(__name__)


def archive_name(url: str) -> str:
    """The archive's URL as shown and stored: scheme, host, port and path, no credentials or query."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/")


@dataclass
class SyncState:
    """What the store knows of its sync with one archive (kept as JSON in the store)."""

    archive: str
    cursor: str | None = None  # YYYYMMDD: every listed study dated before it is stored
    cycles: int = 0
    studies_added: int = 0
    last_success: str | None = None  # ISO time of the last cycle that ended without error
    last_error: str | None = None  # the last cycle's error, if it failed (no credential in it)
    # studies downloaded and not stored: hash of the study_uid -> [instances listed, StudyDate]
    passed_over: dict[str, list] = field(default_factory=dict)


@dataclass
class SyncReport:
    """One cycle."""

    listed: int
    already_stored: int
    studies_written: int
    rejected: int
    clips_embedded: int
    model_id: str | None
    cursor: str | None
    seconds: float

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return asdict(self)


class Syncer:
    """The sync of one store with one DICOMweb archive: a cycle at a time, or every N seconds."""

    def __init__(self, store_root: Path, source, pull_cfg, patient_salt=None, index_config=None,
                 workers: int = 1, site: str = "", lookback_days: int = 7):
        self.root, self.source, self.pull_cfg = Path(store_root), source, pull_cfg
        # a study often reaches the archive days after its StudyDate (sent late, read
        # outside): each cycle searches this far behind the cursor, skipping what is stored
        self.lookback_days = lookback_days
        self.patient_salt, self.index_config, self.workers, self.site = patient_salt, index_config, workers, site
        self.archive = archive_name(source.url)
        key = hashlib.sha256(self.archive.encode()).hexdigest()[:16]
        self.state_path = StoreLayout(self.root).sync_state(key)
        self.running = False  # a cycle under way (the service's /readyz and /metrics read it)

    # -- state --------------------------------------------------------------------------------
    def state(self) -> SyncState:
        """The stored state (a fresh one before the first cycle)."""
        try:
            return SyncState(**json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return SyncState(self.archive)

    def _save(self, state: SyncState) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, json.dumps(asdict(state), indent=1))

    # -- one cycle ----------------------------------------------------------------------------
    def once(self, full: bool = False, progress: bool = False) -> SyncReport:
        """One cycle: search from the cursor (everything with ``full``), pull what is new,
        embed it. Raises the pull's ``InputError`` when the archive cannot be searched (the
        state records it)."""
        from cmr_search.encoder.embed import embed_store
        from cmr_search.encoder.registry import EncoderRegistry
        from cmr_search.ingest import IngestConfig
        from cmr_search.ingest.dicomweb import pull
        from cmr_search.store.clip_store import ClipStore
        from cmr_search.store.config import ClipConfig
        from cmr_search.store.patients import patient_salt
        from cmr_search.store.tombstones import Tombstones

        started = time.monotonic()
        self.running = True
        state = self.state()
        try:
            layout = StoreLayout(self.root)
            store = (ClipStore.open(self.root) if layout.meta.exists()
                     else ClipStore.open(self.root, ClipConfig(), create=True))
            since = self.pull_cfg.since
            if state.cursor and not full:
                cursor = datetime.strptime(state.cursor, "%Y%m%d").date() - timedelta(days=self.lookback_days)
                since = max(since, cursor) if since else cursor
            stored = store.study_uids() if store.has_table("clips") else set()
            tracker, downloaded = _Cursor(state.cursor), []

            def known(ref) -> bool:  # stored, or passed over with no instance added since (not with --full)
                if ref.uid in stored:
                    return True
                seen = None if full else state.passed_over.get(_uid_hash(ref.uid))
                return seen is not None and (ref.instances is None or (seen[0] or 0) >= ref.instances)

            def committed(refs) -> None:  # after each commit: the cursor may move
                downloaded.extend(refs)
                tracker.done(refs)
                state.cursor = tracker.value
                self._save(state)

            report = pull(self.source, store, IngestConfig(clip=store.clip_config, workers=self.workers,
                                                            site=self.site),
                          replace(self.pull_cfg, since=since), patient_salt(store.layout, self.patient_salt),
                          progress=progress, known=known, on_commit=committed, listed=tracker.listed)
            state.cursor = tracker.finish()
            stored = store.study_uids() if store.has_table("clips") else set()
            # a withdrawn study is not remembered: readmitted, it comes back with the next cycle
            stored |= Tombstones(store.layout).withdrawn({ref.uid for ref in downloaded})
            self._passed_over(state, downloaded, stored, since)
            embedded, model_id = 0, EncoderRegistry(self.root).default or layout.latest_model_id()
            if model_id is not None and (report.clips_inserted or report.clips_updated):
                embedded = embed_store(self.root, layout.encoder(model_id), progress=progress,
                                       index_config=self.index_config, set_default=False).clips_embedded
            state.cycles += 1
            state.studies_added += report.studies_written
            state.last_success, state.last_error = _now(), None
            self._save(state)
            return SyncReport(report.studies_listed or 0, report.studies_known, report.studies_written,
                              len(report.rejected), embedded, model_id, state.cursor, time.monotonic() - started)
        except CmrError as error:
            state.last_error = str(error)
            self._save(state)
            raise
        finally:
            self.running = False

    @staticmethod
    def _passed_over(state: SyncState, downloaded, stored: set[str], since) -> None:
        """Remember the studies this cycle downloaded and did not store (``stored``: those
        stored or withdrawn); forget those stored since, and those dated before this cycle's
        search (no cycle lists them again but a ``--full`` one, which downloads every study
        not stored)."""
        for ref in downloaded:
            key = _uid_hash(ref.uid)
            if ref.uid in stored:
                state.passed_over.pop(key, None)
            else:
                state.passed_over[key] = [ref.instances, ref.study_date or ""]
        if since is not None:
            floor = since.strftime("%Y%m%d")
            state.passed_over = {k: v for k, v in state.passed_over.items() if not v[1] or v[1] >= floor}

    def run(self, every_s: float, stop: threading.Event, on_cycle=None, on_error=None) -> None:
        """A cycle every ``every_s`` seconds until ``stop`` is set; a failed cycle is reported
        (``on_error``) and the next one tries again."""
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                report = self.once()
                if on_cycle is not None:
                    on_cycle(report)
            except CmrError as error:
                log.error("sync with %s failed: %s", self.archive, error)
                if on_error is not None:
                    on_error(error)
            stop.wait(max(0.0, every_s - (time.monotonic() - t0)))


class _Cursor:
    """Where the cursor may move: to the date of the oldest listed study not yet committed
    (every study dated before it is stored), or past the newest once all are."""

    def __init__(self, start: str | None):
        self.value = start
        self.pending: dict[str, str] = {}  # listed, not yet committed: uid -> date
        self.newest: str | None = None  # the newest date listed

    def listed(self, refs) -> None:
        """The studies this cycle will download (after the search)."""
        self.pending = {r.uid: r.study_date or "" for r in refs}
        self.newest = max((d for d in self.pending.values() if d), default=None)

    def done(self, refs) -> None:
        """Studies committed by a pass."""
        for ref in refs:
            self.pending.pop(ref.uid, None)
        dated = [d for d in self.pending.values() if d]
        if len(dated) < len(self.pending):  # an undated study left: it cannot be placed, hold still
            return
        oldest = min(dated) if dated else None
        target = oldest if oldest is not None else self.newest
        if target and (self.value is None or target > self.value):
            self.value = target

    def finish(self) -> str | None:
        """The cursor after the cycle (studies that failed to download hold it back)."""
        self.done([])
        return self.value


def _uid_hash(study_uid: str) -> str:
    # a hash, as the tombstones keep: the state says whether a study was passed over, not which
    return hashlib.blake2b(study_uid.encode(), digest_size=16).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
