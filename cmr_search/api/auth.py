"""API keys: ``STORE/secrets/api_keys.json`` keeps only a SHA-256 of each key, with its role.

A key reads ``cmr_<id>_<secret>``: the id finds the entry, the secret (32 random bytes) is
compared by hash in constant time. A random key of that length needs no slow password
hash. The file is re-read when it changes, so ``cmr keys create`` takes effect without a
restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout

__all__ = ["ROLES", "ApiKey", "KeyRing"]

ROLES = ("read", "write")  # write includes read
_KEY_ID = re.compile(r"[0-9a-f]{8}")


@dataclass(frozen=True)
class ApiKey:
    """A registered key (never its secret)."""

    key_id: str
    role: str
    label: str
    created_at: str

    def allows(self, role: str) -> bool:
        """Whether this key may act in ``role``."""
        return ROLES.index(self.role) >= ROLES.index(role)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyRing:
    """The API keys of one store."""

    def __init__(self, store_root: Path):
        self.path = StoreLayout(store_root).api_keys
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._entries: dict[str, dict] = {}

    def _read(self) -> dict[str, dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                self._entries = {e["key_id"]: e for e in json.loads(self.path.read_text())["keys"]}
                self._stamp = stamp
            return self._entries

    def _write(self, entries: dict[str, dict]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".api_keys.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fp:
            json.dump({"format": "cmr-keys/1", "keys": list(entries.values())}, fp, indent=1)
        os.replace(tmp, self.path)  # atomic: readers see the old file or the new one

    def create(self, role: str, label: str = "") -> tuple[str, ApiKey]:
        """A new key: returns (the key, shown once, never stored; its record)."""
        if role not in ROLES:
            raise InputError(f"role {role!r}: use one of {', '.join(ROLES)}")
        key = self.new_key()
        return key, self.register(key, role, label)

    @staticmethod
    def new_key() -> str:
        """A fresh key in the ``cmr_<id>_<secret>`` form, not registered anywhere (for an env file)."""
        return f"cmr_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"

    def register(self, key: str, role: str, label: str = "") -> ApiKey:
        """Register a key made elsewhere (a deployment's env file): its id and hash are kept,
        replacing an older key of the same id; nothing is written when it is already there."""
        if role not in ROLES:
            raise InputError(f"role {role!r}: use one of {', '.join(ROLES)}")
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != "cmr" or not _KEY_ID.fullmatch(parts[1]) or len(parts[2]) < 32:
            raise InputError("an API key reads cmr_<8 hex digits>_<a secret of 32+ characters>; make one with "
                             "`cmr keys create --no-store`")
        entries = dict(self._read())
        old = entries.get(parts[1])
        if old and old["sha256"] == _digest(parts[2]) and old["role"] == role:
            return self._record(old)
        entries[parts[1]] = {"key_id": parts[1], "role": role, "label": label, "sha256": _digest(parts[2]),
                             "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._write(entries)
        return self._record(entries[parts[1]])

    def revoke(self, key_id: str) -> None:
        """Remove a key by its id."""
        entries = dict(self._read())
        if entries.pop(key_id, None) is None:
            raise InputError(f"no API key with id {key_id!r} (see `cmr keys list`)")
        self._write(entries)

    def list(self) -> list[ApiKey]:
        """Registered keys (ids and roles only)."""
        return [self._record(e) for e in self._read().values()]

    def verify(self, key: str) -> ApiKey | None:
        """The key's record when it is registered, else None."""
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != "cmr":
            return None
        entry = self._read().get(parts[1])
        if entry is None or not hmac.compare_digest(entry["sha256"], _digest(parts[2])):
            return None
        return self._record(entry)

    @staticmethod
    def _record(entry: dict) -> ApiKey:
        return ApiKey(entry["key_id"], entry["role"], entry.get("label", ""), entry["created_at"])
