"""The state every machine of a store on object storage shares, beside its tables.

A store at ``s3://bucket/prefix`` keeps its Lance tables under ``URI/lance/`` and the small
objects that more than one machine must agree on under ``URI/state/``, at the same relative
keys as in a local store's folder (``store.json``, ``secrets/withdrawn``, ``secrets/patient_salt``,
``encoders/<model_id>/...``, ``heads/<name>/...``, ``indexes/<table>/<model_id>/...``). Each
machine's state folder (``core.location``) holds its copies of what it reads through a local
file (a model for safetensors, an index for FAISS), its caches and its scratch.

Objects are read and written with obstore, the Python binding of the Rust ``object_store``
client that Lance itself uses: the same credentials from the same environment variables, and
the conditional writes the store's guarantees rest on (create only if absent, replace only if
unchanged since read). A local store has no ``SharedState``: its folder is the shared state.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout, publish_folder

__all__ = ["Blob", "SharedState", "shared_state"]

log = logging.getLogger(__name__)

#: retries of a conditional update that lost to another writer before giving up (each retry
#: re-reads the object, so only a storm of writers to one key exhausts it)
UPDATE_ATTEMPTS = 60


@dataclass(frozen=True)
class Blob:
    """One shared object as read: its bytes and the entity tag that a conditional write names."""

    data: bytes
    etag: str


class SharedState:
    """The shared objects of the store at ``uri`` (under ``URI/state/``). Keys are relative
    POSIX paths, the same as a local store's files (``StoreLayout.key``)."""

    def __init__(self, uri: str):
        import obstore  # noqa: F401 - fail here, with the store's name, if the client is missing
        from obstore.store import from_url

        self.uri = uri.rstrip("/")
        self.base = f"{self.uri}/state"
        # few retries: a state object is tiny, and a request retried for minutes reads as a hung
        # command (the tables' own client keeps Lance's defaults). Plain http (a test server, a
        # private gateway) is allowed as Lance allows it: by AWS_ALLOW_HTTP.
        client = {"timeout": "30s", "connect_timeout": "10s",
                  "allow_http": os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true")}
        self._store = from_url(self.base, client_options=client,
                               retry_config={"max_retries": 3, "retry_timeout": _seconds(30),
                                             "backoff": {"init_backoff": _seconds(0.1),
                                                         "max_backoff": _seconds(2), "base": 2}})

    # -- single objects ------------------------------------------------------------------------
    def get(self, key: str) -> Blob | None:
        """The object at ``key``, or None where there is none."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = obstore.get(self._store, key)
            return Blob(bytes(result.bytes()), result.meta["e_tag"] or "")
        except (NotFoundError, FileNotFoundError):
            return None

    def etag(self, key: str) -> str | None:
        """The entity tag of ``key`` (one HEAD request), or None where there is none: whether a
        copy read before is still current, without reading the object."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return obstore.head(self._store, key)["e_tag"] or ""
        except (NotFoundError, FileNotFoundError):
            return None

    def put(self, key: str, data: bytes) -> None:
        """Write ``key`` whole (a reader sees the old object or the new, never part)."""
        import obstore

        obstore.put(self._store, key, data)

    def put_file(self, key: str, path: Path) -> None:
        """Write ``key`` from a local file, streamed (in parts above a few MB: an index of a
        million vectors is gigabytes, never held in memory whole)."""
        import obstore

        obstore.put(self._store, key, Path(path))

    def get_file(self, key: str, path: Path) -> bool:
        """Write the object at ``key`` to the local file ``path``, streamed; False (and no
        file) where there is none."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = obstore.get(self._store, key)
            with open(path, "wb") as out:
                out.writelines(result.stream(min_chunk_size=8 * 1024 * 1024))
            return True
        except (NotFoundError, FileNotFoundError):
            Path(path).unlink(missing_ok=True)
            return False

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if no object is there; False where one already was (another
        writer's, which wins)."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            obstore.put(self._store, key, data, mode="create")
            return True
        except (AlreadyExistsError, PreconditionError, FileExistsError):
            return False

    def replace(self, key: str, data: bytes, etag: str | None) -> bool:
        """Write ``key`` only if it is still the object of ``etag`` (None: only if absent);
        False where another writer changed it since (re-read and try again)."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        if etag is None:
            return self.create(key, data)
        try:
            obstore.put(self._store, key, data, mode={"e_tag": etag})
            return True
        except (PreconditionError, AlreadyExistsError, FileNotFoundError):
            return False

    def update(self, key: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Read-modify-write ``key`` so that no concurrent writer's change is lost: ``change``
        gets the current bytes (None: absent) and returns the new ones (None: leave it as it
        is); retried on a conflict. Returns what the object holds afterwards."""
        for attempt in range(UPDATE_ATTEMPTS):
            blob = self.get(key)
            current = blob.data if blob else None
            new = change(current)
            if new is None or new == current:
                return current
            if self.replace(key, new, blob.etag if blob else None):
                return new
            time.sleep(min(0.5, 0.01 * 2 ** min(attempt, 6)) * (0.5 + secrets.randbelow(1000) / 1000))
        raise StoreError(f"{self.base}/{key}: {UPDATE_ATTEMPTS} conflicting writers in a row; try again")

    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing where it is absent)."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            obstore.delete(self._store, key)
        except (NotFoundError, FileNotFoundError):
            pass

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (a folder's relative path; "" lists all)."""
        import obstore

        prefix = prefix.strip("/")
        found = obstore.list(self._store, prefix=prefix or None).collect()
        return sorted(meta["path"] for meta in found)

    def etags(self, prefix: str = "") -> dict[str, str]:
        """Every key under ``prefix`` with its entity tag, in one listing: which copies made
        before are still current, without a request per object."""
        import obstore

        prefix = prefix.strip("/")
        found = obstore.list(self._store, prefix=prefix or None).collect()
        return {meta["path"]: meta["e_tag"] or "" for meta in found}

    # -- folders -------------------------------------------------------------------------------
    def upload_folder(self, folder: Path, prefix: str, last: str | None = None) -> None:
        """Copy a local folder's files to the keys under ``prefix``; ``last`` (a file name, the
        one readers look for) is written after every other, so a reader that finds it finds
        the whole folder."""
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(folder).as_posix() == last)
        for path in files:
            self.put_file(f"{prefix.strip('/')}/{path.relative_to(folder).as_posix()}", path)

    def download_folder(self, prefix: str, folder: Path) -> bool:
        """Copy the objects under ``prefix`` into the local ``folder`` (written aside, then
        published by one rename); False where there are none. An existing folder is kept
        (content-addressed folders never change)."""
        folder = Path(folder)
        if folder.exists():
            return True
        keys = self.list(prefix)
        if not keys:
            return False
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            for key in keys:
                path = tmp / key[len(prefix.strip("/")) + 1:]
                path.parent.mkdir(parents=True, exist_ok=True)
                if not self.get_file(key, path):  # removed while listed: the folder is being replaced; give up
                    return False
            folder.parent.mkdir(parents=True, exist_ok=True)
            publish_folder(tmp, folder)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- the guarantees the store rests on -------------------------------------------------------
    def conditional_writes_work(self) -> bool:
        """Whether the object store refuses a second create of one key: what keeps concurrent
        commits (Lance's manifests and this module's updates) from silently losing each
        other. Two tiny writes and a delete."""
        key = f"probe/{secrets.token_hex(8)}"
        try:
            return self.create(key, b"1") and not self.create(key, b"2")
        finally:
            self.delete(key)


def _seconds(value: float):
    from datetime import timedelta

    return timedelta(seconds=value)


@lru_cache(maxsize=16)
def _shared(uri: str, environment: tuple) -> SharedState:
    return SharedState(uri)


def _environment() -> tuple:
    # a client is built from the environment: one made for another endpoint or key is not reused
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "AZURE_"))))


def shared_state(layout: StoreLayout) -> SharedState | None:
    """The shared state of the store ``layout`` describes: None for a local store (its folder
    is the shared state), else the objects under ``URI/state/`` (one client per URI and process)."""
    return None if layout.uri is None else _shared(layout.uri, _environment())
