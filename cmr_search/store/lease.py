"""The study-write lock of a store that several machines share: a lease object on its shared
state (``locks/study-writes.lock``, the key of the local lock file), with the local file lock inside it for the processes of one
machine.

A lease is a small JSON object ``{owner, expires}``. It is taken by a create that fails where
one exists; one whose ``expires`` has passed (its holder died or hung) is taken over by a
replace that names its entity tag, so of two machines taking over the same stale lease one
wins. The holder renews it from a heartbeat thread while it holds it, and deletes it on
release only while it is still its own. Expiry is read on the taker's clock: machines must
keep their clocks in step (NTP) to much better than the lease's life (``TTL_S``).

A lease cannot fence what happens after it expires: a holder paused past it (a stop of the
world, a suspended VM) still commits to Lance, which checks no token. So on a shared store the
lock re-checks the tombstones after its holder's commits (``on_release``, see
``withdrawal.withdraw_again``): either that check sees a withdrawal that came in between, or the
withdrawal's delete ran after the commit.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from filelock import FileLock

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout
from cmr_search.store.object_store import require_conditional_writes
from cmr_search.store.shared import SharedState, shared_state

__all__ = ["TTL_S", "Lease", "StudyWriteLock"]

log = logging.getLogger(__name__)

#: a lease's life in seconds; the holder renews it every third of that
TTL_S = 30.0


class Lease:
    """One holder's lease on ``key`` of a store's shared state (not re-entrant: ``StudyWriteLock``
    counts nesting)."""

    def __init__(self, shared: SharedState, key: str, ttl_s: float = TTL_S):
        self.shared, self.key, self.ttl_s = shared, key, ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lost = False  # set when the heartbeat found the lease taken over
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self, expires: float | None = None) -> bytes:
        expires = time.time() + self.ttl_s if expires is None else expires
        return json.dumps({"owner": self.owner, "expires": round(expires, 3)}).encode()

    def try_acquire(self) -> bool:
        """Take the lease if it is free or stale; whether it is ours now."""
        if self.shared.create(self.key, self._record()):
            return self._held()
        blob = self.shared.get(self.key)
        if blob is None:  # released in between: try again at once
            return self.shared.create(self.key, self._record()) and self._held()
        holder = _parse(blob.data)
        if holder.get("expires", 0) > time.time():
            return False
        if not self.shared.replace(self.key, self._record(), blob.etag):
            return False  # another machine took it over first
        if holder.get("owner") and holder.get("expires", 0) > 0:
            log.warning("took over the store's write lease of %s, stale since %s", holder.get("owner"),
                        time.strftime("%H:%M:%S", time.localtime(holder["expires"])))
        return self._held()

    def acquire(self, timeout: float | None = None) -> None:
        """Wait until the lease is ours (at most ``timeout`` seconds: StoreError after)."""
        start, said, pause = time.monotonic(), False, 0.05
        while not self.try_acquire():
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                raise StoreError(f"the store's write lease ({self.shared.base}/{self.key}) is held by "
                                 f"{self.holder() or 'another writer'}; try again when it is done")
            if not said and waited > 2:
                log.info("waiting for the store's write lease, held by %s", self.holder())
                said = True
            time.sleep(pause * (0.5 + secrets.randbelow(1000) / 1000))
            pause = min(1.0, pause * 1.5)

    def holder(self) -> str | None:
        """The owner named by the lease as it is now (None where there is none)."""
        blob = self.shared.get(self.key)
        return _parse(blob.data).get("owner") if blob else None

    def renew(self) -> bool:
        """Push the lease's expiry on; False (and ``lost``) where it is no longer ours."""
        blob = self.shared.get(self.key)
        if blob is None or _parse(blob.data).get("owner") != self.owner or \
                not self.shared.replace(self.key, self._record(), blob.etag):
            self.lost = True
        return not self.lost

    def release(self) -> None:
        """Give the lease up, only while it is ours (one taken over stays its new holder's)."""
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join()
        blob = self.shared.get(self.key)
        if blob is None or _parse(blob.data).get("owner") != self.owner:
            if not self.lost:
                log.warning("the store's write lease was taken over before its release (%s)", self.key)
            return
        if _parse(blob.data).get("expires", 0) - time.time() > self.ttl_s / 3:
            self.shared.delete(self.key)
        else:  # so near expiry that a taker may come between the read and a delete: expire it instead
            self.shared.replace(self.key, self._record(expires=0), blob.etag)

    def _held(self) -> bool:
        self.lost = False
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.key}", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    log.error("the store's write lease was taken over while held (this process paused for longer "
                              "than %.0f s?); commits after this are checked against the tombstones", self.ttl_s)
                    return
            except Exception:  # a failed request: the next beat tries again before expiry
                log.warning("renewing the store's write lease failed", exc_info=True)


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data)
        return record if isinstance(record, dict) else {}
    except ValueError:  # unreadable: treated as stale, so a damaged object never locks a store for good
        return {}


class StudyWriteLock:
    """The store-wide lock of every commit of study rows: re-entrant within a thread, a file
    lock across the processes of one machine and, for a store shared by machines (``shared``),
    a lease across machines (at ``key``), taken after the file lock so one process per machine
    contends on the bucket. ``on_release(committed)`` runs at the outermost release, still
    holding both, with the studies noted by ``note`` meanwhile (study_uid -> patient key or
    None): the post-commit check against the tombstones."""

    def __init__(self, path: Path, shared: SharedState | None = None, key: str = "",
                 on_acquire: Callable[[], None] | None = None,
                 on_release: Callable[[dict[str, str | None]], None] | None = None):
        self.file = FileLock(path)
        self.shared, self.key, self.on_acquire, self.on_release = shared, key, on_acquire, on_release
        self._local = threading.local()

    @classmethod
    def of(cls, layout: StoreLayout, on_release: Callable[[dict[str, str | None]], None] | None = None
           ) -> StudyWriteLock:
        """The study-write lock of the store ``layout`` describes: its lock file, and on object
        storage the lease at the lock file's key, taken only where conditional writes work."""
        layout.study_write_lock.parent.mkdir(parents=True, exist_ok=True)
        return cls(layout.study_write_lock, shared_state(layout), layout.key(layout.study_write_lock),
                   on_acquire=lambda: require_conditional_writes(layout), on_release=on_release)

    @property
    def depth(self) -> int:
        """How many times the calling thread holds the lock (0: not at all)."""
        return getattr(self._local, "depth", 0)

    def note(self, committed: dict[str, str | None]) -> bool:
        """Remember studies committed under the lock (checked at its release); False where the
        calling thread does not hold it (the caller checks them itself)."""
        if not self.depth:
            return False
        for uid, key in committed.items():
            if key or uid not in self._local.committed:
                self._local.committed[uid] = key
        return True

    def acquire(self) -> Self:
        """Take the lock (wait for it)."""
        self.file.acquire()
        if self.depth == 0:
            try:
                if self.shared is not None:
                    if self.on_acquire is not None:
                        self.on_acquire()
                    self._local.lease = Lease(self.shared, self.key)
                    self._local.lease.acquire()
            except BaseException:
                self.file.release()
                raise
            self._local.committed = {}
        self._local.depth = self.depth + 1
        return self

    def release(self) -> None:
        """Give the lock back (the lease and file lock at the outermost release)."""
        try:
            if self.depth == 1 and self.shared is not None:
                try:
                    if self.on_release is not None and self._local.committed:
                        self.on_release(dict(self._local.committed))
                finally:
                    self._local.lease.release()
        finally:
            self._local.depth = self.depth - 1
            self.file.release()

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
