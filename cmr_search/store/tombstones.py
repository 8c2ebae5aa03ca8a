"""Tombstones: the studies and patients withdrawn from a store, which no later writer may
bring back.

Withdrawal deletes a study's rows; a writer that read the study before the withdrawal
(an ingest that parsed its files, an upload, a sync from the archive) could otherwise
commit it again afterwards. Every writer of study rows checks the tombstones under the
store's write lock, the lock the withdrawal holds, so whatever the interleaving a
withdrawn study stays withdrawn until an operator readmits it (``cmr delete --readmit``).
A withdrawn patient's later studies are kept out as well.

Only a hash of each study_uid or patient key is kept (BLAKE2b, 128 bits), one line per
study (``s:<hash>``, with ``|p:<hash>`` when its patient was withdrawn) and per patient
(``p:<hash>``): the file says whether a given study was withdrawn, not which were. Light on purpose (no
lancedb): the ingest pipeline imports it.

A store on object storage keeps them in one shared object (``secrets/withdrawn`` of
``store.shared``), read anew at every check and changed by conditional updates, so every
machine sees every withdrawal and two withdrawals never lose each other's lines; no machine
holds a copy of its own, which would let it store again what another withdrew.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

from cmr_search.core.layout import StoreLayout, write_atomic
from cmr_search.store.shared import shared_state

__all__ = ["Tombstones", "tombstone"]


def tombstone(kind: str, key: str) -> str:
    """The line a withdrawn study (``kind`` "study", key its study_uid) or patient ("patient",
    its patient key) is remembered by."""
    return f"{kind[0]}:" + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


class Tombstones:
    """The withdrawn studies and patients of one store. Callers that add or check hold the
    store's write lock (``ClipStore.write_lock``), so a check and the commit it guards are
    one step."""

    def __init__(self, root: Path | StoreLayout):
        layout = root if isinstance(root, StoreLayout) else StoreLayout(root)
        self.path = layout.tombstones
        self.shared = shared_state(layout)  # None: a local store, whose file is the tombstones
        self.key = layout.key(self.path)

    def add(self, study_uids: Iterable[str], patient_of: dict[str, str | None] | None = None) -> None:
        """Remember these studies as withdrawn, before their rows are deleted; those in
        ``patient_of`` (study_uid -> patient key) were withdrawn with their patient, whose
        later studies are kept out too."""
        patient_of = patient_of or {}
        study_uids = list(study_uids)

        def change(lines: set[str]) -> set[str]:
            studies = {line.split("|")[0] for line in lines}
            for uid in study_uids:
                key = patient_of.get(uid)
                if key:
                    lines |= {tombstone("study", uid) + f"|{tombstone('patient', key)}", tombstone("patient", key)}
                elif tombstone("study", uid) not in studies:  # withdrawn again: one line is enough
                    lines.add(tombstone("study", uid))
            return lines

        self._change(change)

    def remove(self, study_uids: Iterable[str] = (), patient_keys: Iterable[str] = ()) -> int:
        """Readmit these studies, or these patients with every study withdrawn with them (an
        operator's decision); how many studies and patients were withdrawn."""
        asked = {tombstone("study", u) for u in study_uids} | {tombstone("patient", k) for k in patient_keys}
        gone: set[str] = set()

        def change(lines: set[str]) -> set[str]:
            gone.clear()
            gone.update(line for line in lines if set(line.split("|")) & asked)
            return lines - gone

        self._change(change)
        return len(gone)

    def withdrawn(self, study_uids: Iterable[str], patient_keys: dict[str, str] | None = None) -> set[str]:
        """Those of these study_uids that were withdrawn, or whose patient was
        (``patient_keys``: study_uid -> its patient key, where known)."""
        lines = self.lines()
        if not lines:
            return set()
        known = {part for line in lines for part in line.split("|")}
        patient_keys = patient_keys or {}
        return {u for u in study_uids if tombstone("study", u) in known
                or (u in patient_keys and tombstone("patient", patient_keys[u]) in known)}

    def lines(self) -> set[str]:
        """Every tombstone line as stored now."""
        if self.shared is not None:
            blob = self.shared.get(self.key)
            return _lines(blob.data if blob else None)
        try:
            return _lines(self.path.read_bytes())
        except FileNotFoundError:
            return set()

    def _change(self, change: Callable[[set[str]], set[str]]) -> None:
        """Apply ``change`` to the lines: on object storage by a conditional update, retried
        where another machine changed them in between (so neither change is lost)."""
        if self.shared is not None:
            def update(data: bytes | None) -> bytes | None:
                before = _lines(data)
                after = change(set(before))
                return None if after == before else _text(after).encode()

            self.shared.update(self.key, update)
            return
        before = self.lines()
        after = change(set(before))
        if after != before:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # beside the salt, as private
            write_atomic(self.path, _text(after))


def _lines(data: bytes | None) -> set[str]:
    return set((data or b"").decode().splitlines()) - {""}


def _text(lines: set[str]) -> str:
    return "".join(f"{line}\n" for line in sorted(lines))
