"""``cmr serve --sync URL``: the service keeps its store in step with a DICOMweb archive.

One process runs the cycles (the only worker, or worker slot 0 of several); every worker
reports the sync's state from the store's own record of it (``pacs.sync.SyncState``), so
``/readyz`` and ``/metrics`` say the same whichever worker answers.
"""

from __future__ import annotations

import calendar
import logging
import os
import threading
import time

from cmr_search.api.settings import ServeSettings
from cmr_search.api.workers import current_share

__all__ = ["BackgroundSync"]

log = logging.getLogger(__name__)


class BackgroundSync:
    """The service's sync with one archive: its cycles (in one process) and its state."""

    def __init__(self, settings: ServeSettings):
        from cmr_search.ingest.dicomweb import PullConfig, source_from_env
        from cmr_search.pacs.sync import Syncer
        from cmr_search.store.config import IndexConfig

        source = source_from_env(settings.sync_url, os.environ, token_env=settings.sync_token_env,
                                 username=settings.sync_user, password_env=settings.sync_password_env)
        self.syncer = Syncer(settings.store, source, PullConfig(), settings.patient_salt,
                             IndexConfig.from_settings(settings))
        self.every_s = settings.sync_every_s
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> bool:
        """Run the cycles in a thread of this process, unless another worker does; whether it does."""
        share = current_share()
        if share is not None and share.slot != 0:
            return False
        self.thread = threading.Thread(target=self.syncer.run, args=(self.every_s, self.stop_event),
                                       name="cmr-sync", daemon=True)
        self.thread.start()
        log.info("syncing with %s every %g s", self.syncer.archive, self.every_s)
        return True

    def stop(self) -> None:
        """End the loop after the cycle under way."""
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def status(self) -> dict:
        """The sync's state for /readyz: the archive, the cursor, the last success and error."""
        state = self.syncer.state()
        return {"archive": state.archive, "cursor": state.cursor, "cycles": state.cycles,
                "studies_added": state.studies_added, "last_success": state.last_success,
                "last_error": state.last_error}

    def prometheus(self) -> str:
        """The sync's lines of /metrics."""
        state = self.syncer.state()
        success = (calendar.timegm(time.strptime(state.last_success, "%Y-%m-%dT%H:%M:%SZ"))
                   if state.last_success else 0)
        label = f'{{archive="{state.archive}"}}'
        return (f"# TYPE cmr_sync_cycles_total counter\ncmr_sync_cycles_total{label} {state.cycles}\n"
                f"# TYPE cmr_sync_studies_added_total counter\ncmr_sync_studies_added_total{label} "
                f"{state.studies_added}\n"
                f"# TYPE cmr_sync_last_success_timestamp_seconds gauge\n"
                f"cmr_sync_last_success_timestamp_seconds{label} {success}\n"
                f"# TYPE cmr_sync_failing gauge\ncmr_sync_failing{label} {int(state.last_error is not None)}\n")
