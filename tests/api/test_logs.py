"""The access log never shows a credential a client put in the URL."""

from __future__ import annotations

import logging

from cmr_search.api.logs import RedactCredentials, install_access_log_filter


def test_credentials_in_the_query_string_are_masked_in_access_log_lines():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/heads?api_key=cmr_abc.SECRET&k=5&Token=t0k", "1.1", 401),
                               None)
    assert RedactCredentials().filter(record)
    line = record.getMessage()
    assert "SECRET" not in line and "t0k" not in line
    assert "api_key=***" in line and "k=5" in line and "Token=***" in line


def test_the_filter_is_installed_once():
    install_access_log_filter()
    install_access_log_filter()
    assert sum(isinstance(f, RedactCredentials) for f in logging.getLogger("uvicorn.access").filters) == 1
