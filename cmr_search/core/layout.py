"""The store directory's layout: every path of a store in one place, the ``LATEST`` pointer,
and the atomic writes the store relies on (a folder or a small file published by rename).

The format itself (what each table holds) is described in docs/ARCHITECTURE.md, "The store
directory"; a path spelled anywhere else is a bug waiting for the next layout change.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StoreLayout", "publish_folder", "write_atomic"]


@dataclass(frozen=True)
class StoreLayout:
    """Where each part of the store at ``root`` lives. Path arithmetic: nothing is created.

    ``uri`` is set for a store whose tables are on object storage (``s3://bucket/prefix``):
    ``root`` is then its local state folder, and the tables are under ``URI/lance``. Unless
    given, it is read from the root's ``store.uri`` (absent for a local store).
    """

    root: Path
    uri: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.uri is None:
            try:
                object.__setattr__(self, "uri", self.uri_file.read_text().strip() or None)
            except (FileNotFoundError, NotADirectoryError):  # a local store, or no store yet
                pass

    # -- tables and their metadata -----------------------------------------------------------
    @property
    def meta(self) -> Path:
        """``store.json``: format version and the clip shape (and the tables' URI)."""
        return self.root / "store.json"

    @property
    def uri_file(self) -> Path:
        """The file naming the object-storage URI of a store whose tables are not local."""
        return self.root / "store.uri"

    @property
    def local(self) -> bool:
        """Whether the tables are in the local ``lance/`` folder (not on object storage)."""
        return self.uri is None

    @property
    def lance(self) -> Path | str:
        """The LanceDB database (clips, reports, labels, views, studies, sources): a local
        folder, or a URI string for a store on object storage."""
        return self.root / "lance" if self.uri is None else f"{self.uri}/lance"

    def may_hold_tables(self) -> bool:
        """Whether the store may hold tables yet (worth opening them): its local ``lance/``
        folder exists, or on object storage (not listed here) the store was created."""
        return self.root.joinpath("lance").exists() if self.uri is None else self.meta.exists()

    def table(self, name: str) -> Path | str:
        """A Lance table's folder (a URI string on object storage)."""
        return self.lance / f"{name}.lance" if self.uri is None else f"{self.lance}/{name}.lance"

    def key(self, path: Path) -> str:
        """The key of one of this store's files (a path under ``root``) among the shared
        objects of a store on object storage (``store.shared``): its relative POSIX path."""
        return Path(path).relative_to(self.root).as_posix()

    def table_versions(self, table: str) -> Path | None:
        """A local Lance table's ``_versions`` folder (one manifest per commit); None on
        object storage, where only Lance can say which version is the newest."""
        return self.root / "lance" / f"{table}.lance" / "_versions" if self.uri is None else None

    # -- secrets -------------------------------------------------------------------------------
    @property
    def patient_salt(self) -> Path:
        """The store's own salt for patient keys when ``CMR_PATIENT_SALT`` is unset."""
        return self.root / "secrets" / "patient_salt"

    @property
    def api_keys(self) -> Path:
        """API keys of the service (hashes and roles only)."""
        return self.root / "secrets" / "api_keys.json"

    # -- models ----------------------------------------------------------------------------------
    @property
    def encoders(self) -> Path:
        """Trained encoders, one folder per ``model_id``."""
        return self.root / "encoders"

    def encoder(self, model_id: str) -> Path:
        """The exported encoder ``model_id`` (model.safetensors + config.json)."""
        return self.encoders / model_id

    @property
    def latest(self) -> Path:
        """The file naming the store's newest trained encoder."""
        return self.encoders / "LATEST"

    @property
    def default(self) -> Path:
        """The file naming the store's default model: what search, heads and the service use
        when no model is named (set by the first ``cmr embed`` or ``cmr encoders set-default``)."""
        return self.encoders / "DEFAULT"

    def default_model_id(self) -> str | None:
        """The ``model_id`` that ``DEFAULT`` names, or None where none was set."""
        return _pointer(self.default)

    def set_default(self, model_id: str) -> None:
        """Point ``DEFAULT`` at ``model_id`` (atomically)."""
        write_atomic(self.default, model_id + "\n")

    def vectors_of(self, model_id: str) -> Path:
        """The file in a text-aligned model's folder naming the model whose ``views`` and
        ``studies`` rows it searches (``cmr train-text``: a new text tower over another
        model's stored embeddings, which are never copied)."""
        return self.encoder(model_id) / "VECTORS"

    def vectors_model_id(self, model_id: str) -> str:
        """The ``model_id`` under which ``model_id``'s embeddings are stored: its own, or for
        a text-aligned model the video model's it points at."""
        return _pointer(self.vectors_of(model_id)) or model_id

    @property
    def runs(self) -> Path:
        """Every training run of the store."""
        return self.encoders / "runs"

    def run(self, name: str) -> Path:
        """A training run's folder (checkpoint/ and metrics.csv)."""
        return self.runs / name

    def latest_model_id(self) -> str | None:
        """The ``model_id`` that ``LATEST`` names, or None before the first trained encoder."""
        return _pointer(self.latest)

    def set_latest(self, model_id: str) -> None:
        """Point ``LATEST`` at encoder ``model_id`` (atomically)."""
        write_atomic(self.latest, model_id + "\n")

    @property
    def heads(self) -> Path:
        """Registered heads, one folder per name."""
        return self.root / "heads"

    # -- indexes, caches, bookkeeping ------------------------------------------------------------
    def index(self, table: str, model_id: str) -> Path:
        """The FAISS index generations of (table, model_id) and their ``CURRENT`` file."""
        return self.indexes / table / model_id

    @property
    def indexes(self) -> Path:
        """Every persisted FAISS index."""
        return self.root / "indexes"

    @property
    def eval(self) -> Path:
        """The report of the last ``cmr eval`` (the default ``--out``)."""
        return self.root / "eval"

    @property
    def journal(self) -> Path:
        """Pending withdrawals (empty unless one was interrupted)."""
        return self.root / "journal"

    @property
    def tombstones(self) -> Path:
        """Hashes of the withdrawn study_uids, which no writer may bring back."""
        return self.root / "secrets" / "withdrawn"

    @property
    def study_write_lock(self) -> Path:
        """The file lock every commit of study rows takes, in turn across processes."""
        return self.root / "locks" / "study-writes.lock"

    def study_cache(self, study_uid: str) -> Path:
        """Cached cines of one study, named by a hash so no UID appears in a path."""
        return self.root / "cache" / "studies" / hashlib.sha256(study_uid.encode()).hexdigest()[:24]

    @property
    def study_caches(self) -> Path:
        """Every study's cached cines (``study_cache``)."""
        return self.root / "cache" / "studies"

    @property
    def seen_withdrawals(self) -> Path:
        """The entity tag of the shared tombstones when this machine last dropped its caches of
        withdrawn studies (a store on object storage: withdrawals by other machines)."""
        return self.root / "cache" / "seen-withdrawals"

    @property
    def clusters_cache(self) -> Path:
        """HDBSCAN results per model and table version."""
        return self.root / "cache" / "clusters"

    @property
    def ingest_reports(self) -> Path:
        """One JSON report per ingest run (file paths withheld)."""
        return self.root / "ingest_reports"

    @property
    def tmp(self) -> Path:
        """Scratch of running ingests and uploads."""
        return self.root / "tmp"

    def sync_state(self, archive_key: str) -> Path:
        """``cmr sync``'s state with one archive (its cursor), named by a hash of the archive's URL."""
        return self.root / "sync" / f"{archive_key}.json"

    @property
    def arrivals(self) -> Path:
        """Studies received by DICOM push (``cmr listen``), one folder per association, until
        they are ingested."""
        return self.tmp / "arrivals"

    @staticmethod
    def arrival_caller(folder: Path) -> Path:
        """The file in one association's arrival folder naming the AE title that sent it
        (hidden, so ingestion passes over it): the studies' source when they are ingested."""
        return Path(folder) / ".calling_ae"


def _pointer(path: Path) -> str | None:
    """The model_id a pointer file (LATEST, DEFAULT, VECTORS) names, or None where there is none."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def write_atomic(path: Path, text: str) -> None:
    """Replace a small text file so that a reader sees the old content or the new, never half
    (written and synced to disk before the rename, so a crash cannot publish it empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fp:
        fp.write(text)
        fp.flush()
        os.fsync(fp.fileno())
    os.replace(tmp, path)


def publish_folder(tmp: Path, final: Path) -> Path:
    """Move a complete folder into place by one rename. Content-addressed folders (a
    ``model_id``) that already exist hold the same bytes, so the new copy is dropped."""
    if Path(final).exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    return Path(final)
