"""A store whose tables are on object storage (``--store s3://bucket/prefix``): the check that
the tables' location answers with the credentials of the environment, and the one-machine
limit said where it matters.

Lance reads the standard variables itself (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT``, ``AWS_ALLOW_HTTP``), in every process
that opens a table (Ray tasks, data-loader workers), so no option is threaded through here.
"""

from __future__ import annotations

import logging

import lancedb

from cmr_search.core.exceptions import StoreError
from cmr_search.core.layout import StoreLayout

__all__ = ["CREDENTIALS", "check_reachable"]

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


def check_reachable(layout: StoreLayout, created: bool) -> None:
    """Raise a one-line StoreError unless the tables' location of ``layout`` can be listed.
    With ``created`` (a new store), also refuse a location that already holds tables: they
    belong to a state folder elsewhere (another machine's, or one lost), whose salt and
    tombstones this one lacks."""
    scheme = str(layout.uri).split("://", 1)[0]
    untested = f" ({scheme}:// is untested with cmr; s3:// is)" if scheme in UNTESTED else ""
    try:
        names = lancedb.connect(layout.lance, storage_options=PROBE_OPTIONS).list_tables(limit=1000).tables
    except Exception as error:  # noqa: BLE001 - the native client raises OSError, ValueError or RuntimeError
        raise StoreError(f"cannot reach {layout.uri}{untested}: {_reason(str(error))}; check the bucket and set "
                         f"{CREDENTIALS.get(scheme, 'the credentials of its object store')}") from None
    if not created:
        return
    if names:
        raise StoreError(f"{layout.lance} already holds tables ({', '.join(sorted(names))}) that this machine has no "
                         f"state for (salt, tombstones); only the machine that made it may write it: restore its state "
                         f"folder as CMR_STATE_DIR, or use a new prefix")
    log.warning("store %s: tables on object storage, state (salt, tombstones, write lock) in %s; only this machine "
                "may write or serve this store%s", layout.uri, layout.root, untested)


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
