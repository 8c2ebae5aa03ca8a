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
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fp:
            fp.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def patient_keys_for(layout_or_root: StoreLayout | Path | str, raw_ids: Iterable[str],
                     configured: SecretStr | str | None = None) -> list[str]:
    """The store's keys of raw PatientIDs (blank ones skipped), as ``cmr delete --patient-id``
    needs them; the raw IDs go no further than this function."""
    salt = patient_salt(layout_or_root, configured)
    return [patient_key(raw, salt) for raw in raw_ids if raw.strip()]
