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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from cmr_search.core.layout import StoreLayout, write_atomic

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
        self.path = (root if isinstance(root, StoreLayout) else StoreLayout(root)).tombstones

    def add(self, study_uids: Iterable[str], patient_of: dict[str, str | None] | None = None) -> None:
        """Remember these studies as withdrawn, before their rows are deleted; those in
        ``patient_of`` (study_uid -> patient key) were withdrawn with their patient, whose
        later studies are kept out too."""
        patient_of = patient_of or {}
        before = self._read()
        lines = set(before)
        for uid in study_uids:
            key = patient_of.get(uid)
            lines.add(tombstone("study", uid) + (f"|{tombstone('patient', key)}" if key else ""))
            if key:
                lines.add(tombstone("patient", key))
        self._write(lines, before)

    def remove(self, study_uids: Iterable[str] = (), patient_keys: Iterable[str] = ()) -> int:
        """Readmit these studies, or these patients with every study withdrawn with them (an
        operator's decision); how many studies and patients were withdrawn."""
        studies = {tombstone("study", u) for u in study_uids}
        patients = {tombstone("patient", k) for k in patient_keys}
        lines = self._read()
        gone = {line for line in lines if set(line.split("|")) & (studies | patients)}
        self._write(lines - gone, lines)
        return len(gone)

    def withdrawn(self, study_uids: Iterable[str], patient_keys: dict[str, str] | None = None) -> set[str]:
        """Those of these study_uids that were withdrawn, or whose patient was
        (``patient_keys``: study_uid -> its patient key, where known)."""
        lines = self._read()
        if not lines:
            return set()
        known = {part for line in lines for part in line.split("|")}
        patient_keys = patient_keys or {}
        return {u for u in study_uids if tombstone("study", u) in known
                or (u in patient_keys and tombstone("patient", patient_keys[u]) in known)}

    def _read(self) -> set[str]:
        try:
            return set(self.path.read_text().splitlines()) - {""}
        except FileNotFoundError:
            return set()

    def _write(self, lines: set[str], before: set[str]) -> None:
        if lines != before:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # beside the salt, as private
            write_atomic(self.path, "".join(f"{line}\n" for line in sorted(lines)))
