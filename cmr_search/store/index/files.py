"""The persisted form of one index: generation folders and the ``CURRENT`` pointer.

``DIR/indexes/<table>/<model_id>/gen-<version>-<rand>/`` holds ``index.faiss``, ``ids.npy``,
``revs.npy`` and ``meta.json`` (the Lance version it reflects, kind, dim). ``CURRENT`` names
the generation in use and is switched atomically once the folder is complete; then earlier
generations and the leftovers of killed saves are dropped. A crash leaves the previous
generation; damaged files load as no index at all, so they are rebuilt, never served.

For a store on object storage the generations are shared (``store.shared``) at the same
keys under the bucket's ``state/``: a generation switched to here is uploaded (``meta.json``
last) and the shared ``CURRENT`` replaced only if unchanged since read and not newer than
it (the rule of the local switch, across machines), then the older shared generations are
deleted; a machine whose copy is missing or older than the shared ``CURRENT`` downloads that
generation before it loads (``pull``). Each machine reads its own copy: FAISS reads files.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from filelock import FileLock

from cmr_search.core.layout import publish_folder, write_atomic
from cmr_search.store.clip_store import process_alive
from cmr_search.store.shared import SharedState

__all__ = ["Generation", "IndexFiles"]

log = logging.getLogger(__name__)

SWITCH_LOCK = ".switch.lock"
#: the files of a generation, in the order they are uploaded: readers key on the last
FILES = ("index.faiss", "ids.npy", "revs.npy", "meta.json")


@dataclass
class Generation:
    """One persisted index as loaded: the faiss index, its sorted ids, their revs and meta.json."""

    index: faiss.Index
    ids: np.ndarray
    revs: np.ndarray
    meta: dict


class IndexFiles:
    """The generations of one (table, model_id) under ``folder`` (``StoreLayout.index``),
    and on object storage their shared copies under ``key`` (``StoreLayout.key(folder)``)."""

    def __init__(self, folder: Path, shared: SharedState | None = None, key: str | None = None):
        self.folder = Path(folder)
        self.shared, self.key = shared, key
        self.downloaded: str | None = None  # the shared generation this machine last downloaded

    @property
    def pointer(self) -> Path:
        """The ``CURRENT`` file naming the generation in use."""
        return self.folder / "CURRENT"

    def current(self) -> str | None:
        """The name of the local generation in use, or None."""
        try:
            return self.pointer.read_text().strip() or None
        except FileNotFoundError:
            return None

    def load(self, dim: int) -> Generation | None:
        """The current generation, or None when there is none or it cannot be trusted
        (unreadable, another dimension, ids that do not match the index). On object storage
        the shared generation is downloaded first where it is newer than this machine's."""
        if self.shared is not None:
            self.pull()
        name = self.current()
        if name is None:
            return None
        gen = self.folder / name
        try:
            meta = json.loads((gen / "meta.json").read_text())
            index = faiss.read_index(str(gen / "index.faiss"))
            ids, revs = np.load(gen / "ids.npy"), np.load(gen / "revs.npy")
        except (OSError, RuntimeError, ValueError) as error:  # damaged files: rebuilding is always safe
            log.warning("index %s unreadable (%s); it will be rebuilt", gen, error)
            return None
        if meta.get("dim") != dim or index.ntotal != len(ids):
            log.warning("index %s does not match its table; it will be rebuilt", gen)
            return None
        return Generation(index, ids, revs, meta)

    def write(self, blob: np.ndarray, ids: np.ndarray, revs: np.ndarray, meta: dict) -> str:
        """Persist a serialized index as a new generation, switch ``CURRENT`` to it and drop
        the older ones; returns the name of the generation in use afterwards.

        A generation of an older table version than the current one is never switched to:
        a slow background save begun before a withdrawal would otherwise put the withdrawn
        vectors back on disk after the withdrawal's own save."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"gen-{meta['version']:08d}-{secrets.token_hex(3)}"
        tmp = self.folder / f"{name}.{os.getpid()}.tmp"
        tmp.mkdir()
        blob.tofile(tmp / "index.faiss")
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "revs.npy", revs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        with FileLock(self.folder / SWITCH_LOCK):  # the version check and the switch are one step
            current = self.current()
            if current is not None and _version(current) > meta["version"]:
                shutil.rmtree(tmp, ignore_errors=True)
                return current
            publish_folder(tmp, self.folder / name)
            write_atomic(self.pointer, name)
            self.drop_old(name)
        if self.shared is not None:
            self.push(name)
        return name

    def drop_old(self, keep: str) -> None:
        """Remove every generation but ``keep``, and leftovers of saves whose process died."""
        for old in self.folder.iterdir():
            if old.name in (keep, "CURRENT", SWITCH_LOCK) or (old.suffix == ".tmp" and process_alive(old.name.split(".")[-2])):
                continue  # another process's save in progress
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)

    # -- the shared copies (a store on object storage) -------------------------------------------
    def _shared_current(self):
        blob = self.shared.get(f"{self.key}/CURRENT")
        return blob, (blob.data.decode().strip() if blob else None)

    def push(self, name: str | None = None) -> bool:
        """Share the local generation ``name`` (default: the one in use) unless the bucket's
        ``CURRENT`` already names one of its table version or newer; whether it did. Then the
        shared generations older than it are deleted, so a withdrawn vector leaves the bucket
        with the generation that held it."""
        name = name or self.current()
        if name is None or not (self.folder / name / "meta.json").exists():
            return False
        blob, current = self._shared_current()
        if current is not None and _version(current) >= _version(name):
            return False  # (the same rows, or newer: nothing to add)
        prefix = f"{self.key}/{name}"
        for file in FILES:  # meta.json last: a generation without it is incomplete
            self.shared.put_file(f"{prefix}/{file}", self.folder / name / file)
        while not self.shared.replace(f"{self.key}/CURRENT", name.encode(), blob.etag if blob else None):
            blob, current = self._shared_current()  # another machine switched it: the same rule again
            if current is not None and _version(current) >= _version(name):
                self._delete_shared(name)
                return False
        for old in self._shared_generations():
            if old != name and _version(old) <= _version(name):  # newer ones may be uploads in progress
                self._delete_shared(old)
        log.info("index %s: generation %s shared", self.key, name)
        return True

    def pull(self) -> str | None:
        """Download the shared ``CURRENT`` generation where this machine has none or an older
        one, and switch the local ``CURRENT`` to it (the local rule: never to an older one); its
        name, or None where nothing was downloaded. A generation that cannot be read whole
        (deleted by a newer switch meanwhile) is left: ``sync`` brings the local one forward."""
        try:
            _, name = self._shared_current()
            local = self.current()
            if name is None or (local is not None and _version(local) >= _version(name)):
                return None
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f"{name}.{os.getpid()}.tmp"  # drop_old spares it while this process lives
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                for file in reversed(FILES):  # meta.json first: absent, the generation is not whole
                    if not self.shared.get_file(f"{self.key}/{name}/{file}", tmp / file):
                        return None
                with FileLock(self.folder / SWITCH_LOCK):
                    local = self.current()
                    if local is not None and _version(local) >= _version(name):
                        return None
                    publish_folder(tmp, self.folder / name)
                    write_atomic(self.pointer, name)
                    self.drop_old(name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception as error:  # noqa: BLE001 - the bucket unreachable (obstore's errors are no OSError)
            # not an error: the local copy, or a rebuild from the table, serves instead
            log.warning("index %s: shared generation not downloaded (%s)", self.key, error)
            return None
        self.downloaded = name
        log.info("index %s: downloaded generation %s from %s", self.key, name, self.shared.base)
        return name

    def _shared_generations(self) -> list[str]:
        depth = self.key.count("/") + 1
        return sorted({key.split("/")[depth] for key in self.shared.list(self.key)
                       if key.count("/") > depth and key.split("/")[depth].startswith("gen-")})

    def _delete_shared(self, name: str) -> None:
        for key in self.shared.list(f"{self.key}/{name}"):
            self.shared.delete(key)


def _version(generation: str) -> int:
    """The table version a generation folder (``gen-<version>-<rand>``) was built at."""
    return int(generation.split("-")[1])


def _fsync(path: Path) -> None:
    with open(path, "rb") as fp:
        os.fsync(fp.fileno())
