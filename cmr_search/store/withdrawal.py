"""Withdrawal: studies (or every study of a patient) removed from the whole store.

A privacy operation over every table (clips, reports, labels, views, studies, sources), the FAISS
indexes, the caches and the saved ingest reports, so it sits above both the tables and the
indexes. A journal entry (``DIR/journal/withdraw-*.json``: the study_uids) is written first
and deleted last; ``finish_pending_withdrawals`` completes one a crash interrupted, and the
entry points that search or write (``withdraw`` itself, ``Searcher``, ``cmr embed``, the
evaluation) call it after opening the store. With ``purge`` (the default) each table is
rewritten and every older version dropped, so the bytes leave the disk, not only the view.

On a store shared by machines (object storage) the journal entries are shared objects, so any
machine finishes a withdrawal another was killed in (or one that a commit overtook:
``journal.withdraw_overtaken``); and each machine drops its own caches of studies another
withdrew when it sees the tombstones changed (``forget_withdrawn``).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from lancedb.index import Bitmap, BTree, LabelList

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout, write_atomic
from cmr_search.store.clip_store import sql_quote
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.index.vector_index import refresh_indexes
from cmr_search.store.journal import Journal
from cmr_search.store.shared import shared_state
from cmr_search.store.sources import SOURCES_TABLE
from cmr_search.store.tombstones import Tombstones

__all__ = ["WithdrawReport", "finish_pending_withdrawals", "forget_withdrawn", "readmit", "withdraw"]

log = logging.getLogger(__name__)

#: every table with a study_uid column, in the order rows are deleted (``sources``: where
#: each study came from, so nothing says the study was ever here)
TABLES = ("clips", "reports", "labels", "views", "studies", SOURCES_TABLE)


@dataclass
class WithdrawReport:
    """What a withdrawal removed."""

    study_uids: list[str]
    rows_deleted: dict[str, int]  # table -> rows removed

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {"studies": len(self.study_uids), "study_uids": self.study_uids, "rows_deleted": self.rows_deleted}


def withdraw(store: EmbeddingStore, study_uids: list[str] = (), patient_keys: list[str] = (),
             purge: bool = True) -> WithdrawReport:
    """Remove studies (or every study of a patient) everywhere: clips, reports, labels,
    views, studies, the FAISS indexes, cached cines and clusters, and ingest reports.

    Takes the store's study-write lock and first finishes any withdrawal a crash left
    pending. With ``purge`` the old table versions are rewritten away, so the bytes are gone
    from disk, not only hidden (readers still on an old version fail).
    """
    with store.write_lock():
        _finish_pending(store)
        patient_of = _studies_of(store, study_uids, patient_keys)
        uids = list(patient_of)
        journal = Journal(store.layout)
        name = journal.add({"study_uids": uids, "patient_of": patient_of, "purge": purge})
        report = _remove(store, uids, purge, patient_of)
        journal.done(name)
        return report


def readmit(store: EmbeddingStore, study_uids: list[str] = (), patient_keys: list[str] = ()) -> int:
    """Lift the tombstones of withdrawn studies or patients, so that ingest, uploads and sync
    may store them again (an operator's decision, e.g. consent given anew); how many were
    withdrawn. Nothing comes back by itself: the studies must be ingested again."""
    with store.write_lock():
        return Tombstones(store.layout).remove(study_uids, patient_keys)


def finish_pending_withdrawals(store: EmbeddingStore) -> list[WithdrawReport]:
    """Complete every withdrawal whose journal entry a crash left behind (a ``stat`` when
    there is none; one LIST on object storage, where any machine's entries are seen). Waits
    for the study-write lock, so a withdrawal still running in another process (or machine)
    is never done twice at once. On object storage, first drop this machine's caches of
    studies other machines withdrew (``forget_withdrawn``)."""
    forget_withdrawn(store.layout)
    if not Journal(store.layout).names(unfinished=True):
        return []
    with store.write_lock():
        return _finish_pending(store)


def _finish_pending(store: EmbeddingStore) -> list[WithdrawReport]:
    """``finish_pending_withdrawals`` for a caller holding the write lock."""
    journal = Journal(store.layout)
    reports = []
    for name in journal.names():
        entry = journal.read(name)
        if entry is None:  # finished by another machine since listed
            continue
        log.warning("finishing an interrupted withdrawal of %d studies", len(entry["study_uids"]))
        reports.append(_remove(store, entry["study_uids"], entry["purge"], entry.get("patient_of", {})))
        journal.done(name)
    journal.drop_unfinished()
    return reports


def forget_withdrawn(layout: StoreLayout) -> bool:
    """On a store shared by machines: where the tombstones changed since this machine last
    looked (another machine withdrew studies), drop its cached cines and cluster lists, which
    may show the withdrawn studies, and their entries in its ingest reports; whether it did.
    One HEAD request; nothing for a local store (its own withdrawals scrub its caches). Cine
    folders are named by a hash this machine cannot match to a tombstone, so all of them go
    (they are made again on demand)."""
    shared = shared_state(layout)
    if shared is None:
        return False
    etag = shared.etag(layout.key(layout.tombstones)) or ""
    try:
        seen = layout.seen_withdrawals.read_text().strip()
    except FileNotFoundError:
        seen = ""
    if etag == seen:
        return False
    shutil.rmtree(layout.study_caches, ignore_errors=True)
    shutil.rmtree(layout.clusters_cache, ignore_errors=True)
    reported = _reported(layout.ingest_reports)
    keys = {u: k for u, k in reported.items() if k}
    _scrub_ingest_reports(layout.ingest_reports, Tombstones(layout).withdrawn(reported, keys))
    write_atomic(layout.seen_withdrawals, etag + "\n")
    return True


def _studies_of(store: EmbeddingStore, study_uids: list[str], patient_keys: list[str]) -> dict[str, str | None]:
    """The stored studies asked for by study_uid or patient key, each with its patient key
    when that patient is withdrawn too (sorted by study_uid); none is an error."""
    asked = ", ".join(f"'{sql_quote(u)}'" for u in study_uids)
    keys = ", ".join(f"'{sql_quote(k)}'" for k in patient_keys)
    uids: dict[str, str | None] = {}
    for name in TABLES:
        if not store.has(name):
            continue
        table = store.clip_store.db.open_table(name)
        clauses = [f"study_uid IN ({asked})"] if asked else []
        if keys and "patient_key" in table.schema.names:
            clauses.append(f"patient_key IN ({keys})")
        if clauses:
            columns = ["study_uid", "patient_key"] if "patient_key" in table.schema.names else ["study_uid"]
            rows = table.search().where(" OR ".join(clauses)).select(columns).limit(None).to_arrow().to_pylist()
            for row in rows:
                uids.setdefault(row["study_uid"], None)
                if row.get("patient_key") in patient_keys:
                    uids[row["study_uid"]] = row["patient_key"]
    if not uids:
        what = ", ".join([*(f"study {u}" for u in study_uids), *(f"patient {k}" for k in patient_keys)])
        raise InputError(f"nothing to withdraw: no {what} in {store.root} (check the study_uid or patient key)")
    return dict(sorted(uids.items()))


def _remove(store: EmbeddingStore, uids: list[str], purge: bool,
            patient_of: dict[str, str | None] | None = None) -> WithdrawReport:
    """Delete the studies' rows from every table (and with ``purge`` their history), then
    from the indexes, the ingest reports and the caches. Tombstones first: from here on no
    writer commits these studies again (each checks them under the lock held here)."""
    Tombstones(store.layout).add(uids, patient_of or {})
    deleted: dict[str, int] = {}
    uid_list = ", ".join(f"'{sql_quote(u)}'" for u in uids)
    for name in TABLES:
        if not store.has(name):
            continue
        table = store.clip_store.db.open_table(name)
        where = f"study_uid IN ({uid_list})"
        n = table.count_rows(where)
        if n:
            table.delete(where)
        if purge:
            _purge_history(store.clip_store.db, name)
        deleted[name] = n
    refresh_indexes(store)
    layout = store.layout
    _scrub_ingest_reports(layout.ingest_reports, set(uids))
    _scrub_caches(layout, uids)
    return WithdrawReport(uids, deleted)


def _purge_history(db, name: str) -> None:
    """Rewrite a table into fresh files and drop every older version, so deleted rows (and
    the delete predicates in old transaction files) leave the disk; compaction alone keeps
    rows inside fragments whose deleted share is small."""
    table = db.open_table(name)
    indices = [(ix.columns, ix.index_type) for ix in table.list_indices()]
    reader = table.search().limit(None).to_batches()
    table = db.create_table(name, data=reader, schema=table.schema, mode="overwrite")
    with warnings.catch_warnings():  # "removes every version except the latest": the point here
        warnings.simplefilter("ignore", UserWarning)
        table.optimize(cleanup_older_than=timedelta(0), delete_unverified=True)
    scalar = {"BTree": BTree, "Bitmap": Bitmap, "LabelList": LabelList}
    for columns, kind in indices:  # scalar indexes come back; a vector index is FAISS' job here
        if kind in scalar:
            table.create_index(columns[0], config=scalar[kind]())


def _scrub_caches(layout: StoreLayout, uids: list[str]) -> None:
    """Drop derived files of the withdrawn studies (cines) and every cached cluster list
    (they name exemplar studies)."""
    for uid in uids:
        shutil.rmtree(layout.study_cache(uid), ignore_errors=True)
    shutil.rmtree(layout.clusters_cache, ignore_errors=True)


def _reported(folder: Path) -> dict[str, str | None]:
    """study_uid -> patient key (None where not given) of every study the saved ingest
    reports name."""
    found: dict[str, str | None] = {}
    for path in folder.glob("*.json") if folder.exists() else ():
        for value in json.loads(path.read_text()).values():
            for entry in value if isinstance(value, list) else ():
                if isinstance(entry, dict) and entry.get("study_uid"):
                    found[entry["study_uid"]] = entry.get("patient_key") or found.get(entry["study_uid"])
    return found


def _scrub_ingest_reports(folder: Path, uids: set[str]) -> None:
    """Drop the withdrawn studies' entries from the saved ingest reports."""
    if not folder.exists():
        return
    for path in folder.glob("*.json"):
        report = json.loads(path.read_text())
        changed = False
        for key, value in report.items():
            if isinstance(value, list):
                kept = [v for v in value if not (isinstance(v, dict) and v.get("study_uid") in uids)]
                changed |= len(kept) != len(value)
                report[key] = kept
        if changed:
            write_atomic(path, json.dumps(report, indent=1))
