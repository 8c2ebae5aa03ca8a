"""Patient keys: the salted HMAC that stands in for a PatientID everywhere in a store, and
the salt it is keyed with (the configured ``CMR_PATIENT_SALT``, else the store's own).

On a store shared by machines (object storage) the store's own salt is a shared object,
created once (the first machine's wins) and cached in each machine's state folder: two
machines ingesting one patient give it one key.

Light on purpose: ingest workers import it, so it must not import lancedb (nor pydantic:
a configured ``SecretStr`` is unwrapped by duck typing).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout
from cmr_search.store.shared import shared_state

if TYPE_CHECKING:
    from pydantic import SecretStr

__all__ = ["patient_key", "patient_keys_for", "patient_salt"]


def patient_key(patient_id: str, salt: bytes) -> str:
    """Salted HMAC-SHA256 of the PatientID: stable per archive, not reversible without the salt."""
    return hmac.new(salt, patient_id.strip().encode(), hashlib.sha256).hexdigest()[:20]


def patient_salt(layout_or_root: StoreLayout | Path | str, configured: SecretStr | str | None = None) -> bytes:
    """The salt for patient keys: the configured one, else the store's own random salt
    (made on first use, 0600; on object storage shared by every machine)."""
    if configured is not None and hasattr(configured, "get_secret_value"):
        configured = configured.get_secret_value()
    if configured:
        return configured.encode()
    layout = layout_or_root if isinstance(layout_or_root, StoreLayout) else StoreLayout(layout_or_root)
    path = layout.patient_salt
    if not path.exists():
        _create_salt(path, _shared_salt(layout))
    salt = path.read_text().strip()
    if not salt:  # only a store damaged by hand gets here: the salt is published whole or not at all
        raise StoreError(f"{path} is empty; restore it from a backup (patient keys of this store depend on it) "
                         "or set CMR_PATIENT_SALT to the salt it was made with")
    return salt.encode()


def _shared_salt(layout: StoreLayout) -> str | None:
    """The salt of a store on object storage, made here where no machine made it yet (a
    create that fails where one exists: the loser reads the winner's); None for a local store."""
    shared = shared_state(layout)
    if shared is None:
        return None
    key = layout.key(layout.patient_salt)
    blob = shared.get(key)
    if blob is None:
        shared.create(key, secrets.token_hex(32).encode())
        blob = shared.get(key)
    if blob is None or not blob.data.strip():
        raise StoreError(f"{shared.base}/{key} is missing or empty; restore it from a backup (patient keys of this "
                         "store depend on it) or set CMR_PATIENT_SALT to the salt it was made with")
    return blob.data.decode().strip()


def _create_salt(path: Path, value: str | None = None) -> None:
    # Written whole to a private file, then published by link(), which fails if another
    # process published first: every process reads one complete salt, and a kill leaves
    # either none or a whole one (check-then-create-then-write let two processes race).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fp:
            fp.write(value or secrets.token_hex(32))
            fp.flush()
            os.fsync(fp.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process's salt won; use it
    finally:
        tmp.unlink(missing_ok=True)


def patient_keys_for(layout_or_root: StoreLayout | Path | str, raw_ids: Iterable[str],
                     configured: SecretStr | str | None = None) -> list[str]:
    """The store's keys of raw PatientIDs (blank ones skipped), as ``cmr delete --patient-id``
    needs them; the raw IDs go no further than this function."""
    salt = patient_salt(layout_or_root, configured)
    return [patient_key(raw, salt) for raw in raw_ids if raw.strip()]
