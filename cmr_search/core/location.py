"""Where a store lives: a local folder, or Lance tables and shared state on object storage
(``s3://``, ``gs://``, ``az://``) with each machine's part of the store in a local state
folder of that URI.

``--store`` and ``CMR_STORE`` name either. A folder is the whole store, as always. A URI keeps
the tables (clips, reports, labels, views, studies, sources) under ``URI/lance/``, the state
every machine must agree on (store.json, the patient salt, tombstones, the journal of
withdrawals, the write lease) under ``URI/state/`` (``store.shared``), and this machine's
copies, caches, locks and scratch in the state folder: ``CMR_STATE_DIR`` where set, else
``~/.cache/cmr/stores/<scheme>/<bucket>/<prefix>`` (``$XDG_CACHE_HOME`` replaces ``~/.cache``).
The state folder's ``store.uri`` names the URI, so every module keeps working on a local
root; ``StoreLayout`` reads it to place the tables.

Several machines may write and serve such a store, each with its own state folder: a new one
joins the store by copying its shared ``store.json`` (``store.object_store.open_shared``), and
every commit of study rows holds a lease on the bucket besides the local lock
(``store.lease``); docs/ARCHITECTURE.md, "The store directory".
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout, write_atomic

__all__ = ["OBJECT_SCHEMES", "is_object_uri", "normalize", "state_dir_for", "store_root"]

#: object stores Lance reaches through the same client (Rust ``object_store``); only S3 is
#: tested here (against moto), the others differ in credentials alone
OBJECT_SCHEMES = ("s3", "gs", "az")


def is_object_uri(value: str | Path) -> bool:
    """Whether ``value`` names an object-storage location (``s3://``, ``gs://``, ``az://``)."""
    return isinstance(value, str) and "://" in value and value.split("://", 1)[0].lower() in OBJECT_SCHEMES


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix) of a URI, the prefix without its slashes at either end."""
    scheme, rest = uri.split("://", 1)
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if bucket in ("", ".", "..") or any(part in ("", ".", "..") for part in prefix.split("/") if prefix):
        raise StoreError(f"{uri!r} is not a store URI; write {scheme}://BUCKET/PREFIX (no empty, '.' or '..' parts)")
    return scheme.lower(), bucket, prefix


def normalize(uri: str) -> str:
    """The URI spelled one way: lower-case scheme, no trailing slash."""
    scheme, bucket, prefix = _split(uri)
    return f"{scheme}://{bucket}/{prefix}".rstrip("/")


def state_dir_for(uri: str, state_dir: Path | None = None) -> Path:
    """The local state folder of the store at ``uri``: ``state_dir`` (``CMR_STATE_DIR``) where
    given, else one under the user's cache named after the URI (the scheme too, so that
    ``s3://x`` and ``gs://x`` never share one)."""
    if state_dir is not None:
        return Path(state_dir).expanduser().resolve()
    scheme, bucket, prefix = _split(uri)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cmr" / "stores" / scheme / bucket / PurePosixPath(prefix or ".")


def store_root(value: str | Path, state_dir: Path | None = None) -> Path:
    """The local root of the store ``value`` names: a folder as it is, or for a URI its state
    folder, bound to the URI on first use (``store.uri``). A state folder bound to another
    URI, or holding a local store, is refused: one state folder serves one store."""
    if isinstance(value, str) and "://" in value and not is_object_uri(value):
        raise StoreError(f"{value!r}: a store is a folder or an object-storage URI ({', '.join(OBJECT_SCHEMES)}://BUCKET/PREFIX)")
    if not is_object_uri(value):
        return Path(value)
    uri = normalize(str(value))
    root = state_dir_for(uri, state_dir)
    layout = StoreLayout(root)
    if layout.uri is None and layout.meta.exists():
        raise StoreError(f"the state folder {root} holds a local store; point CMR_STATE_DIR at an empty folder for {uri}")
    if layout.uri is None:
        write_atomic(layout.uri_file, uri + "\n")
    elif layout.uri != uri:
        raise StoreError(f"the state folder {root} belongs to {layout.uri}, not {uri}; set CMR_STATE_DIR to "
                         f"another folder for {uri} (one state folder per store)")
    return root
