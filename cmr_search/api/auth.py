"""API keys: ``STORE/secrets/api_keys.json`` keeps only a SHA-256 of each key, with its role.

A key reads ``cmr_<id>_<secret>``: the id finds the entry, the secret (32 random bytes) is
compared by hash in constant time. A random key of that length needs no slow password
hash. The file is re-read when it changes, so ``cmr keys create`` takes effect without a
restart.

A store on object storage keeps the file as one shared object (``state/secrets/api_keys.json``)
so every replica of the service accepts the same keys: changed by compare-and-swap (no
concurrent ``cmr keys create`` is lost), and re-read when its entity tag changes, asked at
most every ``KEY_REFRESH_S`` (a revoked key stops working within that).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.store.shared import shared_state

__all__ = ["ROLES", "ApiKey", "KeyRing"]

ROLES = ("read", "write")  # write includes read
_KEY_ID = re.compile(r"[0-9a-f]{8}")
#: on object storage, how often (seconds) the keys' entity tag is asked for (one HEAD request)
KEY_REFRESH_S = 1.0


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

    def __init__(self, store_root: Path, refresh_s: float = KEY_REFRESH_S):
        layout = StoreLayout(store_root)
        self.path = layout.api_keys
        self._shared = shared_state(layout)
        self._key = layout.key(self.path)
        self.refresh_s, self._checked = refresh_s, -float("inf")
        self._lock = threading.Lock()
        self._stamp: tuple | str | None = None
        self._entries: dict[str, dict] = {}

    def _read(self) -> dict[str, dict]:
        return self._read_file() if self._shared is None else self._read_shared()

    def _read_shared(self) -> dict[str, dict]:
        with self._lock:
            if time.monotonic() - self._checked < self.refresh_s:
                return self._entries
        etag = self._shared.etag(self._key)
        if etag is None:  # none shared yet: a store from before sharing keeps its file until a change
            entries = self._read_file()
        else:
            with self._lock:
                if etag == self._stamp:
                    self._checked = time.monotonic()
                    return self._entries
            blob = self._shared.get(self._key)
            entries = _parse(blob.data) if blob else {}
            etag = blob.etag if blob else None
        with self._lock:
            self._entries, self._stamp, self._checked = entries, etag, time.monotonic()
            return entries

    def _read_file(self) -> dict[str, dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if stamp != self._stamp:
                self._entries = _parse(self.path.read_bytes())
                self._stamp = stamp
            return self._entries

    def _change(self, change: Callable[[dict[str, dict]], bool]) -> None:
        """Apply ``change`` (edits the entries in place; whether it changed any) to the keys:
        the file, or on object storage the shared object without losing a concurrent change."""
        if self._shared is None:
            entries = dict(self._read())
            if change(entries):
                self._write(entries)
            return

        def edit(old: bytes | None) -> bytes | None:
            entries = _parse(old) if old is not None else dict(self._read_file())
            return _dump(entries).encode() if change(entries) else None

        self._shared.update(self._key, edit)
        with self._lock:
            self._checked = -float("inf")  # read it back on the next check

    def _write(self, entries: dict[str, dict]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".api_keys.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fp:
            fp.write(_dump(entries))
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
        kept: list[dict] = []

        def add(entries: dict[str, dict]) -> bool:
            old = entries.get(parts[1])
            if old and old["sha256"] == _digest(parts[2]) and old["role"] == role:
                kept[:] = [old]
                return False
            entries[parts[1]] = {"key_id": parts[1], "role": role, "label": label, "sha256": _digest(parts[2]),
                                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            kept[:] = [entries[parts[1]]]
            return True

        self._change(add)
        return self._record(kept[0])

    def revoke(self, key_id: str) -> None:
        """Remove a key by its id."""
        def remove(entries: dict[str, dict]) -> bool:
            if entries.pop(key_id, None) is None:
                raise InputError(f"no API key with id {key_id!r} (see `cmr keys list`)")
            return True

        self._change(remove)

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


def _parse(data: bytes) -> dict[str, dict]:
    return {e["key_id"]: e for e in json.loads(data)["keys"]}


def _dump(entries: dict[str, dict]) -> str:
    return json.dumps({"format": "cmr-keys/1", "keys": list(entries.values())}, indent=1)
