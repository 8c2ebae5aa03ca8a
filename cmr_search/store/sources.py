"""Where each study came from: the ``sources`` table, one row per study (its archive, how it
arrived, when it was first and last delivered from there), so that a search result can
link back to the hospital archive that holds the images.

The row is written in the same commit step as the study's clips (``ingest.pipeline``, under
the store's write lock, withdrawn studies left out), so a withdrawn study never gets its
source row back. The archive is a display name with no credential: a DICOMweb URL loses its
userinfo, query and fragment (a token can ride in either), a DICOM push names the calling
AE title, a file ingest its ``--site`` label or "files". Nothing here names a patient.

A store made before this table has none: every study's source is then unknown (``None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa

from cmr_search.store.clip_store import ClipStore, sql_quote

__all__ = ["KINDS", "SOURCES_TABLE", "SOURCE_SCHEMA", "Origin", "Sources", "archive_url"]

SOURCES_TABLE = "sources"
#: how a study can arrive
KINDS = ("files", "dicomweb", "dicom-push")
#: fragments (one per commit) the small table may hold before it is compacted
_COMPACT_FRAGMENTS = 32


def archive_url(url: str) -> str:
    """A DICOMweb base URL as a display name: without userinfo (``user:pass@``), query or
    fragment, any of which may carry a credential."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal goes back into brackets
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class Origin:
    """Where a batch of studies came from: ``kind`` (one of ``KINDS``) and the archive's
    display name."""

    kind: str
    archive: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"source kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.archive.strip():
            raise ValueError("a source needs an archive name; give the site label, URL or AE title")

    @classmethod
    def files(cls, site: str = "") -> Origin:
        """A file ingest (``cmr ingest PATHS``), named by its site label."""
        return cls("files", site.strip() or "files")

    @classmethod
    def dicomweb(cls, url: str) -> Origin:
        """A DICOMweb pull from the server at ``url`` (credentials stripped)."""
        return cls("dicomweb", archive_url(url))

    @classmethod
    def push(cls, calling_ae: str | None) -> Origin:
        """A DICOM push (``cmr listen``) from the AE that opened the association."""
        return cls("dicom-push", f"DICOM push from AE {(calling_ae or '').strip() or 'unknown'}")


SOURCE_SCHEMA = pa.schema([
    pa.field("study_uid", pa.string(), nullable=False),
    pa.field("archive", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("first_seen", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("last_seen", pa.timestamp("ms", tz="UTC"), nullable=False),
])


class Sources:
    """The ``sources`` table of one store (read through the clip store's connection)."""

    def __init__(self, store: ClipStore):
        self.store = store

    def record(self, study_uids: list[str], origin: Origin, now: datetime | None = None) -> int:
        """Note that these studies were just delivered by ``origin``; how many rows were
        written. The caller holds the write lock and passes only studies it committed (none
        withdrawn). A study keeps its ``first_seen`` while it keeps coming from the same
        archive; from another archive its row starts again (the row names the latest)."""
        uids = sorted(set(study_uids))
        if not uids:
            return 0
        now = now or datetime.now(UTC)
        db = self.store.db
        first: dict[str, datetime] = {}
        stored = []
        if self.store.has_table(SOURCES_TABLE):
            where = "study_uid IN (" + ", ".join(f"'{sql_quote(u)}'" for u in uids) + ")"
            stored = db.open_table(SOURCES_TABLE).search().where(where).limit(None).to_arrow().to_pylist()
        for row in stored:
            if (row["kind"], row["archive"]) == (origin.kind, origin.archive):
                first[row["study_uid"]] = row["first_seen"]
        rows = [{"study_uid": u, "archive": origin.archive, "kind": origin.kind, "first_seen": first.get(u, now),
                 "last_seen": now} for u in uids]
        data = pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
        table = db.create_table(SOURCES_TABLE, schema=SOURCE_SCHEMA, exist_ok=True)
        if stored:
            table.merge_insert("study_uid").when_matched_update_all().when_not_matched_insert_all().execute(data)
        else:  # none of them has a row yet: a plain append skips the merge's join set-up
            table.add(data)
        self.store.committed(dict.fromkeys(uids))  # on object storage: checked against the tombstones again
        if table.stats()["fragment_stats"]["num_fragments"] > _COMPACT_FRAGMENTS:
            table.optimize()
        return len(rows)

    def of(self, study_uid: str) -> dict | None:
        """The source row of one study (archive, kind, first_seen, last_seen), or None when
        unknown (no row, or a store from before this table)."""
        if not self.store.has_table(SOURCES_TABLE):
            return None
        rows = (self.store.db.open_table(SOURCES_TABLE).search().where(f"study_uid = '{sql_quote(study_uid)}'")
                .limit(1).to_list())
        return rows[0] if rows else None
