"""The persisted form of one index: generation folders and the ``CURRENT`` pointer.

``DIR/indexes/<table>/<model_id>/gen-<version>-<rand>/`` holds ``index.faiss``, ``ids.npy``,
``revs.npy`` and ``meta.json`` (the Lance version it reflects, kind, dim). ``CURRENT`` names
the generation in use and is switched atomically once the folder is complete; then earlier
generations and the leftovers of killed saves are dropped. A crash leaves the previous
generation; damaged files load as no index at all, so they are rebuilt, never served.
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

__all__ = ["Generation", "IndexFiles"]

log = logging.getLogger(__name__)

SWITCH_LOCK = ".switch.lock"


@dataclass
class Generation:
    """One persisted index as loaded: the faiss index, its sorted ids, their revs and meta.json."""

    index: faiss.Index
    ids: np.ndarray
    revs: np.ndarray
    meta: dict


class IndexFiles:
    """The generations of one (table, model_id) under ``folder`` (``StoreLayout.index``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def pointer(self) -> Path:
        """The ``CURRENT`` file naming the generation in use."""
        return self.folder / "CURRENT"

    def load(self, dim: int) -> Generation | None:
        """The current generation, or None when there is none or it cannot be trusted
        (unreadable, another dimension, ids that do not match the index)."""
        if not self.pointer.exists():
            return None
        gen = self.folder / self.pointer.read_text().strip()
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
            current = self.pointer.read_text().strip() if self.pointer.exists() else None
            if current is not None and _version(current) > meta["version"]:
                shutil.rmtree(tmp, ignore_errors=True)
                return current
            publish_folder(tmp, self.folder / name)
            write_atomic(self.pointer, name)
            self.drop_old(name)
        return name

    def drop_old(self, keep: str) -> None:
        """Remove every generation but ``keep``, and leftovers of saves whose process died."""
        for old in self.folder.iterdir():
            if old.name in (keep, "CURRENT", SWITCH_LOCK) or (old.suffix == ".tmp" and process_alive(old.name.split(".")[-2])):
                continue  # another process's save in progress
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _version(generation: str) -> int:
    """The table version a generation folder (``gen-<version>-<rand>``) was built at."""
    return int(generation.split("-")[1])


def _fsync(path: Path) -> None:
    with open(path, "rb") as fp:
        os.fsync(fp.fileno())
