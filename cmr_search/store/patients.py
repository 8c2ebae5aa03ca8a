"""Patient keys: the salted HMAC that stands in for a PatientID everywhere in a store, and
the salt it is keyed with (the configured ``CMR_PATIENT_SALT``, else the store's own).

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

if TYPE_CHECKING:
    from pydantic import SecretStr

__all__ = ["patient_key", "patient_keys_for", "patient_salt"]


def patient_key(patient_id: str, salt: bytes) -> str:
    """Salted HMAC-SHA256 of the PatientID: stable per archive, not reversible without the salt."""
    return hmac.new(salt, patient_id.strip().encode(), hashlib.sha256).hexdigest()[:20]


def patient_salt(layout_or_root: StoreLayout | Path | str, configured: SecretStr | str | None = None) -> bytes:
    """The salt for patient keys: the configured one, else the store's own random salt
    (made on first use, 0600)."""
    if configured is not None and hasattr(configured, "get_secret_value"):
        configured = configured.get_secret_value()
    if configured:
        return configured.encode()
    layout = layout_or_root if isinstance(layout_or_root, StoreLayout) else StoreLayout(layout_or_root)
    path = layout.patient_salt
    if not path.exists():
        _create_salt(path)
    salt = path.read_text().strip()
    if not salt:  # only a store damaged by hand gets here: the salt is published whole or not at all
        raise StoreError(f"{path} is empty; restore it from a backup (patient keys of this store depend on it) "
                         "or set CMR_PATIENT_SALT to the salt it was made with")
    return salt.encode()


def _create_salt(path: Path) -> None:
    # Written whole to a private file, then published by link(), which fails if another
    # process published first: every process reads one complete salt, and a kill leaves
    # either none or a whole one (check-then-create-then-write let two processes race).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fp:
            fp.write(secrets.token_hex(32))
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
