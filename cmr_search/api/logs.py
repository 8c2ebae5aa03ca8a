"""What the access log may show: never a credential a client put in the URL.

The API reads keys only from the ``Authorization`` header, but a client may still send one
as ``?api_key=...``; uvicorn's access log writes the full path with its query string, so
such values are masked before the line is written.
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactCredentials", "install_access_log_filter"]

#: query parameters whose values are credentials, by a part of their name
_SECRET = re.compile(r"(?i)([?&][^=&#]*(?:key|token|secret|passw|auth|sig)[^=&#]*=)[^&#]*")


class RedactCredentials(logging.Filter):
    """Masks credential-like query values in uvicorn's access log records (and any message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_SECRET.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = _SECRET.sub(r"\1***", record.msg)
        return True


def install_access_log_filter() -> None:
    """Add the filter to uvicorn's access logger once per process."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactCredentials) for f in access.filters):
        access.addFilter(RedactCredentials())
