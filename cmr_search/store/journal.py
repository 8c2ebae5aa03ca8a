"""Pending withdrawals: the journal a withdrawal writes before it deletes anything and removes
when it is done (``withdrawal``), and on a store shared by machines the commits a withdrawal
overtook, which are put in it again.

The journal is ``DIR/journal/withdraw-*.json`` of a local store and shared objects under
``journal/`` of a store on object storage, so any machine finishes a withdrawal another was
killed in (``withdrawal.finish_pending_withdrawals``: one LIST when there is none).

Overtaken commits: on object storage the study-write lock is a lease, which cannot fence a
Lance commit (a holder paused past its lease still commits). So after its commits a writer
checks the committed studies against the tombstones again (``withdraw_overtaken``, run by the
write lock at its release): a withdrawal writes its tombstones before it deletes, so either
this check sees them, or the withdrawal's delete came after the commit. What it finds is
deleted from every table at once and journaled, so the rest of a withdrawal (history purged,
indexes rewritten, caches scrubbed) is done by the next ``finish_pending_withdrawals`` on any
machine. Below the withdrawal (the tables' layer calls it), so it imports no index.
"""

from __future__ import annotations

import json
import logging
import os
import secrets

from cmr_search.core.layout import StoreLayout
from cmr_search.store.shared import shared_state
from cmr_search.store.tombstones import Tombstones

__all__ = ["Journal", "withdraw_overtaken"]

log = logging.getLogger(__name__)


class Journal:
    """The entries of pending withdrawals: files in ``DIR/journal`` of a local store, shared
    objects (``journal/...``) of a store on object storage, which every machine sees."""

    def __init__(self, layout: StoreLayout):
        self.folder, self.shared = layout.journal, shared_state(layout)
        self.prefix = layout.key(layout.journal)

    def add(self, entry: dict) -> str:
        """Write an entry whole (before anything is deleted); its name."""
        name = f"withdraw-{secrets.token_hex(6)}.json"
        if self.shared is not None:
            self.shared.put(f"{self.prefix}/{name}", json.dumps(entry).encode())
            return name
        self.folder.mkdir(exist_ok=True)
        tmp = (self.folder / name).with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, self.folder / name)
        return name

    def names(self, unfinished: bool = False) -> list[str]:
        """The pending entries' names, sorted (with ``unfinished``, a local folder's entries
        never completed too)."""
        if self.shared is not None:
            return [k.rsplit("/", 1)[1] for k in self.shared.list(self.prefix) if k.endswith(".json")]
        if not self.folder.exists():
            return []
        return sorted(p.name for p in self.folder.glob("withdraw-*" if unfinished else "withdraw-*.json"))

    def read(self, name: str) -> dict | None:
        """One entry (None where it is gone)."""
        if self.shared is not None:
            blob = self.shared.get(f"{self.prefix}/{name}")
            return json.loads(blob.data) if blob else None
        try:
            return json.loads((self.folder / name).read_text())
        except FileNotFoundError:
            return None

    def done(self, name: str) -> None:
        """Remove an entry: its withdrawal is complete."""
        if self.shared is not None:
            self.shared.delete(f"{self.prefix}/{name}")
        else:
            (self.folder / name).unlink()

    def drop_unfinished(self) -> None:
        """Remove local entries never completed (their withdrawal deleted nothing yet); a
        shared entry is written whole or not at all."""
        if self.shared is None and self.folder.exists():
            for tmp in self.folder.glob("withdraw-*.tmp"):
                tmp.unlink()


def withdraw_overtaken(store, studies: dict[str, str | None]) -> list[str]:
    """After commits to the ``ClipStore`` ``store`` on object storage: those of the committed
    ``studies`` (study_uid -> patient key, or None where the committer did not have it) that
    are withdrawn now, deleted from every table again and journaled for the rest of their
    withdrawal; which ones. One GET of the tombstones when none was overtaken."""
    tombstones = Tombstones(store.layout)
    lines = tombstones.lines()
    if not lines:
        return []
    keys = {u: k for u, k in studies.items() if k}
    unknown = [u for u in studies if u not in keys]
    if unknown and any(line.startswith("p:") for line in lines) and store.has_table("clips"):
        rows = store.clips.search().where(_where(unknown)).select(["study_uid", "patient_key"]).limit(None).to_arrow()
        keys |= dict(zip(rows["study_uid"].to_pylist(), rows["patient_key"].to_pylist()))
    overtaken = sorted(tombstones.withdrawn(studies, keys))
    if not overtaken:
        return []
    log.warning("%d studies committed here were withdrawn meanwhile (on another machine?); withdrawing them again",
                len(overtaken))
    alone = tombstones.withdrawn(overtaken)  # withdrawn by study_uid; the others with their patient
    with store.write_lock():
        Journal(store.layout).add({"study_uids": overtaken, "purge": True,
                                   "patient_of": {u: None if u in alone else keys.get(u) for u in overtaken}})
        for name in store.db.list_tables(limit=1000).tables:
            table = store.db.open_table(name)
            if "study_uid" in table.schema.names:
                table.delete(_where(overtaken))
    return overtaken


def _where(study_uids: list[str]) -> str:
    return "study_uid IN (" + ", ".join("'" + u.replace("'", "''") + "'" for u in study_uids) + ")"
