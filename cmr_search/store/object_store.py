"""A store whose tables are on object storage (``--store s3://bucket/prefix``): the check that
the tables' location answers with the credentials of the environment, the conditional writes
every writer relies on, and how a machine joins such a store.

Several machines may write and serve one such store: its ``store.json``, patient salt,
tombstones, journal of withdrawals and write lease are shared objects under ``URI/state/``
(``store.shared``), and each machine keeps its own state folder (``core.location``) for copies,
caches and scratch. The first machine publishes ``store.json`` by a create that fails where one
exists (of two creators, the loser reads the winner's); a machine opening the store from a new
state folder copies it (joins). A prefix holding tables but no shared ``store.json`` was made by
a cmr that kept that state on one machine: only that machine (its state folder) opens it, and
publishes it on its next open.

Lance reads the standard variables itself (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT``, ``AWS_ALLOW_HTTP``), in every process
that opens a table (Ray tasks, data-loader workers), so no option is threaded through here.
"""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout, write_atomic
from cmr_search.store.shared import shared_state

__all__ = ["CREDENTIALS", "check_reachable", "join", "open_shared", "require_conditional_writes"]

log = logging.getLogger(__name__)

#: what to set for each scheme (the variables Lance's object_store client reads)
CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION (for an S3-compatible server also "
          "AWS_ENDPOINT_URL, and AWS_ALLOW_HTTP=true when it is plain http)",
    "gs": "GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS",
    "az": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
}
#: schemes Lance supports through the same client, never run against a server here
UNTESTED = ("gs", "az")
# the probe fails fast: object_store retries a failing request for minutes by default, which
# reads as a hung command when a bucket is simply unreachable
PROBE_OPTIONS = {"client_max_retries": "1", "client_retry_timeout": "10"}


def check_reachable(layout: StoreLayout, created: bool) -> list[str]:
    """Raise a one-line StoreError unless the tables' location of ``layout`` can be listed;
    the tables there. With ``created`` (a new store: no ``store.json`` is shared there), also
    refuse a location that already holds tables: a cmr that kept the store's state (salt,
    tombstones) on one machine made them, and only that machine's state folder can open them."""
    import lancedb  # here: a command that only resolves --store need not load it

    scheme = str(layout.uri).split("://", 1)[0]
    untested = f" ({scheme}:// is untested with cmr; s3:// is)" if scheme in UNTESTED else ""
    try:
        names = lancedb.connect(layout.lance, storage_options=PROBE_OPTIONS).list_tables(limit=1000).tables
    except Exception as error:  # noqa: BLE001 - the native client raises OSError, ValueError or RuntimeError
        raise StoreError(f"cannot reach {layout.uri}{untested}: {_reason(str(error))}; check the bucket and set "
                         f"{CREDENTIALS.get(scheme, 'the credentials of its object store')}") from None
    if created and names:
        raise StoreError(f"{layout.lance} already holds tables ({', '.join(sorted(names))}) but no shared store state "
                         f"({layout.uri}/state/store.json): an older cmr made it and kept its salt and tombstones on "
                         f"one machine; open it once from that machine's state folder (CMR_STATE_DIR) to share them, "
                         f"or use a new prefix")
    if created and untested:
        log.warning("store %s:%s", layout.uri, untested)
    return list(names)


def open_shared(layout: StoreLayout, new: dict | None = None) -> None:
    """Bring the state folder of a store on object storage in line with the store: copy its
    shared ``store.json`` where this folder has none (a machine joining) or another (the
    prefix made anew); with ``new`` (the metadata of a store to create) publish it where none
    is shared yet; a ``store.json`` of this folder that was never shared (an older cmr's) is
    published with the salt and tombstones it kept. Nothing where no store is there and
    ``new`` is None (the caller says so)."""
    check_reachable(layout, created=False)  # first: an unreachable bucket is one clear line
    shared = shared_state(layout)
    key = layout.key(layout.meta)
    blob = shared.get(key)
    mine = layout.meta.read_bytes() if layout.meta.exists() else None
    if blob is None and mine is not None:
        require_conditional_writes(layout)
        _publish_local_state(layout, shared)
        blob = shared.get(key)
    elif blob is None and new is not None:
        check_reachable(layout, created=True)
        require_conditional_writes(layout)
        if shared.create(key, json.dumps(new, indent=2).encode()):
            log.info("store %s created: tables and shared state on object storage, this machine's state in %s",
                     layout.uri, layout.root)
        blob = shared.get(key)  # ours, or that of a machine that created it first
    if blob is not None and blob.data != mine:
        if mine is not None:
            log.warning("store %s: the state folder %s had another store.json; using the shared one", layout.uri, layout.root)
        else:
            log.info("joined store %s (state in %s)", layout.uri, layout.root)
        write_atomic(layout.meta, blob.data.decode())


def join(root: Path) -> Path:
    """``root`` as it is, a store on object storage's state folder that has no ``store.json``
    yet first joining the store where one is shared (what every command does with ``--store``,
    so checks of the local ``store.json`` see the store)."""
    layout = StoreLayout(root)
    if layout.uri is not None and not layout.meta.exists():
        open_shared(layout)
    return Path(root)


def _publish_local_state(layout: StoreLayout, shared) -> None:
    """Share what an older cmr kept in this machine's state folder (store.json, the salt, the
    tombstones, pending withdrawals, models and heads), so other machines can join; each only
    where none is shared yet."""
    from cmr_search.store.models import publish_local_models

    pending = sorted(layout.journal.glob("withdraw-*.json")) if layout.journal.exists() else []
    for path in (layout.patient_salt, layout.tombstones, *pending):
        if path.exists():
            shared.create(layout.key(path), path.read_bytes())
    publish_local_models(layout)
    shared.create(layout.key(layout.meta), layout.meta.read_bytes())  # last: other machines join on it
    log.warning("store %s: its store.json, salt, tombstones, models and heads are now shared objects under "
                "%s/state/, so other machines may join it", layout.uri, layout.uri)


#: the shared states (one per URI and environment: ``shared_state``) seen to honour conditional writes
_CONDITIONAL_OK: weakref.WeakSet = weakref.WeakSet()


def require_conditional_writes(layout: StoreLayout) -> None:
    """Refuse to write a store on object storage that does not honour conditional writes
    (create only if absent): there concurrent commits, Lance's and the shared state's, would
    silently lose each other. Probed once per process and URI."""
    shared = shared_state(layout)
    if shared is None or shared in _CONDITIONAL_OK:
        return
    if not shared.conditional_writes_work():
        raise StoreError(f"{layout.uri}: the object store ignores conditional writes (If-None-Match), so concurrent "
                         f"writers would silently lose each other's commits; cmr writes only to one that honours "
                         f"them (AWS S3, Google Cloud Storage, Azure Blob Storage, recent MinIO)")
    _CONDITIONAL_OK.add(shared)


def _reason(message: str) -> str:
    """The cause in a native client error (a nested Rust debug dump), in a few words."""
    causes = (("NoSuchBucket", "no such bucket"), ("CredentialsNotLoaded", "no credentials found"),
              ("BadScheme", "a plain-http endpoint needs AWS_ALLOW_HTTP=true"),
              ("ConnectionRefused", "nothing answers at the endpoint"), ("Connect", "cannot connect to the endpoint"),
              ("AccessDenied", "access denied"), ("InvalidAccessKeyId", "unknown access key"),
              ("SignatureDoesNotMatch", "wrong secret key"), ("status: 403", "access denied"),
              ("account name", "no storage account configured"))
    for needle, cause in causes:
        if needle in message:
            return cause
    return (message.strip().splitlines() or ["unknown error"])[0][:160]
