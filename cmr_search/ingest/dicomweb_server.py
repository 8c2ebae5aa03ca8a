"""A DICOMweb server as a source of studies: where it is and how to authenticate
(``DicomWebSource``, its secrets read from environment variables the caller names), what to
ask it (``PullConfig``, ``study_query``), a ``dicomweb-client`` on its own session, the
QIDO-RS search (``find_studies``) and the server's failures in words that say what to do.

Credentials live in ``SecretStr`` and in the request session only. Errors are raised
outside the ``except`` block that caught the server's, so no chained exception carries the
request (whose headers hold the token).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING
from urllib.parse import quote_plus, urlsplit

import requests
from pydantic import SecretStr

from cmr_search.core.exceptions import InputError

if TYPE_CHECKING:
    from dicomweb_client.api import DICOMwebClient

__all__ = ["DicomWebSource", "PullConfig", "Refused", "Retry", "StudyRef", "client_for", "find_studies", "list_all",
           "parse_query", "parse_since", "problem", "source_from_env", "study_query"]

# tags of the QIDO-RS answer this module reads; the rest (patient name, ID, birth date, ...)
# is dropped where it arrives
_STUDY_UID, _N_INSTANCES, _STUDY_DATE = "0020000D", "00201208", "00080020"
_TAG = re.compile(r"[0-9A-Fa-f]{8}")


@dataclass(frozen=True)
class DicomWebSource:
    """A DICOMweb server and how to authenticate: a bearer token, or HTTP basic auth (a user
    and password, as Orthanc has), or nothing. The env var names are kept for messages only."""

    url: str
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    token_env: str | None = None  # where the token came from, to name it in an error
    password_env: str | None = None
    timeout_s: float = 60.0  # per request: to connect, and between bytes of an answer
    verify_tls: bool = True

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"{self.url!r} is not a DICOMweb URL; give the service root, such as "
                             "https://pacs.example.org/dicom-web (Orthanc: http://host:8042/dicom-web)")
        if parts.username or parts.password:
            raise InputError("the DICOMweb URL carries credentials, which would end up in logs and shell history; "
                             "give a token with --token-env VAR, or --user NAME with --password-env VAR")
        if self.token is not None and (self.username or self.password is not None):
            raise InputError("give either a bearer token or a user and password for DICOMweb, not both")
        if (self.username is None) != (self.password is None):
            raise InputError("basic authentication needs both a user name (--user) and a password (--password-env VAR)")
        if self.token is not None and not self.token.get_secret_value().isprintable():
            where = f"${self.token_env}" if self.token_env else "the bearer token"
            raise InputError(f"{where} holds a line break or another character an HTTP header cannot carry; "
                             "set it to the token alone")
        object.__setattr__(self, "url", self.url.rstrip("/"))

    def credentials_hint(self) -> str:
        """What to check when the server refuses: the credentials given and where they came from."""
        if self.token is not None:
            where = f" in ${self.token_env}" if self.token_env else ""
            return f"check the bearer token{where} (expired? for this server?)"
        if self.username is not None:
            where = f" in ${self.password_env}" if self.password_env else ""
            return f"check the user name {self.username!r} and its password{where}"
        return "pass --token-env VAR (a bearer token in VAR) or --user NAME --password-env VAR (basic auth)"


def source_from_env(url: str, environ: Mapping[str, str], token_env: str | None = None, username: str | None = None,
                    password_env: str | None = None, timeout_s: float = 60.0) -> DicomWebSource:
    """A ``DicomWebSource`` whose token or password is read from the environment variable the
    caller names (never from a command-line value, which shell history and ``ps`` would show)."""

    def secret(var: str | None, what: str) -> SecretStr | None:
        if var is None:
            return None
        value = environ.get(var, "")
        if not value:
            raise InputError(f"the environment variable {var} (the DICOMweb {what}) is not set or empty; "
                             f"export {var}=... before running, or name another variable")
        return SecretStr(value)

    return DicomWebSource(url, token=secret(token_env, "bearer token"), username=username,
                          password=secret(password_env, "password"), token_env=token_env,
                          password_env=password_env, timeout_s=timeout_s)


@dataclass(frozen=True)
class PullConfig:
    """Which studies to pull and how hard to pull them."""

    modality: str = "MR"  # ModalitiesInStudy; "" for any
    since: date | None = None  # StudyDate on or after
    filters: tuple[tuple[str, str], ...] = ()  # further QIDO-RS matching keys (keyword or tag, value)
    # 2 connections keep 2 ingest workers fed once instances are written unparsed (more only
    # took cores from them; measured)
    connections: int = 2  # studies downloaded at once, one connection each
    studies_on_disk: int = 12  # studies downloading or downloaded, not yet built, at once (bounds the scratch)
    studies_per_commit: int = 6  # built studies committed together (a sync's cursor moves after each commit)
    attempts: int = 3  # tries per study before it is reported as failed
    backoff_s: float = 1.0  # wait before the 2nd try; doubles for each further one
    page_size: int = 500  # studies per QIDO-RS page

    def __post_init__(self) -> None:
        if min(self.connections, self.studies_on_disk, self.studies_per_commit, self.attempts, self.page_size) < 1:
            raise InputError("connections, studies on disk, studies per commit, attempts and page size must be >= 1")
        if self.studies_on_disk < self.connections:
            raise InputError(f"studies_on_disk ({self.studies_on_disk}) must be at least connections ({self.connections})")


def parse_query(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings (a DICOM keyword or 8-digit tag, then a QIDO-RS matching value)."""
    from pydicom.datadict import tag_for_keyword

    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise InputError(f"--query {item!r} is not KEY=VALUE; for example --query StudyDescription=*CARDIAC*")
        if not _TAG.fullmatch(key) and tag_for_keyword(key) is None:
            raise InputError(f"--query {item!r}: {key!r} is no DICOM keyword; use one such as StudyDescription, "
                             "InstitutionName, ReferringPhysicianName, or an 8-digit tag such as 00081030")
        out.append((key, value))
    return tuple(out)


def parse_since(text: str) -> date:
    """``YYYY-MM-DD`` (--since) as a date."""
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"--since {text!r} is not a date; write it YYYY-MM-DD, e.g. 2024-01-31") from None


def study_query(cfg: PullConfig) -> dict[str, str]:
    """The QIDO-RS matching keys of a pull: modality, the date range, then the given filters."""
    query = {}
    if cfg.modality:
        query["ModalitiesInStudy"] = cfg.modality
    if cfg.since is not None:
        query["StudyDate"] = f"{cfg.since:%Y%m%d}-"
    for key, value in cfg.filters:
        if key == "StudyDate" and cfg.since is not None:
            raise InputError("--since and --query StudyDate=... both set the study date; give one of them")
        query[key] = value
    return query


@dataclass(frozen=True)
class StudyRef:
    """A study the search listed: its UID and how many instances the server says it holds."""

    uid: str
    instances: int | None = None
    study_date: str | None = None  # YYYYMMDD as the search gave it (a sync's cursor moves by it)


def client_for(source: DicomWebSource) -> tuple[DICOMwebClient, requests.Session]:
    """A client on its own session (one per thread: a requests Session is not thread-safe)."""
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.verify = source.verify_tls
    if source.token is not None:
        session.headers["Authorization"] = f"Bearer {source.token.get_secret_value()}"
    elif source.username is not None and source.password is not None:
        session.auth = (source.username, source.password.get_secret_value())
    else:
        session.auth = requests.utils.get_netrc_auth(source.url)
    # the environment's proxies, CA bundle and .netrc resolved once per session, as requests
    # would per request: it walks os.environ twice for every request, a tenth of the client's
    # CPU in a pull of a few hundred series (measured)
    session.proxies.update(requests.utils.get_environ_proxies(source.url))
    if session.verify is True:
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    session.trust_env = False
    try:
        client = DICOMwebClient(source.url, session=session, timeout=(min(10.0, source.timeout_s), source.timeout_s))
    except ValueError as err:
        session.close()
        raise InputError(f"dicomweb-client cannot use the URL {source.url!r} ({err}); give the service root, "
                         "such as https://pacs.example.org/dicom-web") from None
    client.set_http_retry_params(retry=False)  # retries are ours: per study, with backoff, then reported
    return client, session


class Refused(Exception):
    """A failed download not worth another try (an instance of another study, a stopped pull)."""


class Retry(Exception):
    """A download that ended without an error but short of the study: worth another try."""


def problem(err: Exception) -> tuple[str, bool]:
    """(what went wrong in words, whether another try may help); never the request itself."""
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
        words = f"HTTP {status} {err.response.reason or ''}".strip()
        return words, status in (408, 425, 429) or status >= 500
    if isinstance(err, requests.exceptions.SSLError):
        return "TLS handshake failed (certificate not trusted or not for this host)", False
    if isinstance(err, requests.Timeout):
        return "no answer in time", True
    if isinstance(err, requests.ConnectionError):
        return "connection failed (refused, reset or host unknown)", True
    if isinstance(err, (Refused, Retry)):
        return str(err), isinstance(err, Retry)
    if isinstance(err, requests.exceptions.InvalidJSONError):
        return "the answer is not JSON", False
    if isinstance(err, requests.RequestException):  # its text can quote a header (a token) back
        return f"the request failed ({type(err).__name__})", False
    return f"{type(err).__name__}: {str(err)[:200]}", True


def _search_error(source: DicomWebSource, err: Exception) -> InputError:
    """The search's failure as an InputError that says what to do."""
    status = err.response.status_code if isinstance(err, requests.HTTPError) and err.response is not None else None
    words, _ = problem(err)
    if status in (401, 403) and source.token is None and source.username is None:
        return InputError(f"the DICOMweb server at {source.url} asks for credentials ({words}); "
                          f"{source.credentials_hint()}")
    if status in (401, 403):
        return InputError(f"the DICOMweb server at {source.url} refused the credentials ({words}); "
                          f"{source.credentials_hint()}")
    if status == 404:
        return InputError(f"no DICOMweb service at {source.url} ({words}); give the DICOMweb root, such as "
                          "http://host:8042/dicom-web for Orthanc")
    if status is not None and status < 500:
        return InputError(f"the DICOMweb server at {source.url} rejected the study search ({words}); "
                          "check the --query filters and --since")
    if status is not None:
        return InputError(f"the DICOMweb server at {source.url} failed to answer the study search ({words}); "
                          "try again later, or ask its administrator")
    if isinstance(err, requests.exceptions.SSLError):
        return InputError(f"cannot reach the DICOMweb server at {source.url} securely: {words}")
    if isinstance(err, requests.Timeout):
        return InputError(f"the DICOMweb server at {source.url} did not answer within {source.timeout_s:.0f} s; "
                          "check the URL, the network, or try again later")
    if isinstance(err, requests.ConnectionError):
        return InputError(f"cannot reach the DICOMweb server at {source.url}: {words}; check the host and port, "
                          "that the server is running, and any proxy or firewall on the way")
    return InputError(f"the answer of {source.url} to a study search is not DICOM JSON ({words}); "
                      "is the URL the DICOMweb root?")


def find_studies(source: DicomWebSource, cfg: PullConfig) -> tuple[list[StudyRef], list[str]]:
    """QIDO-RS: the studies matching ``cfg`` and any warnings. Raises InputError when the
    server cannot be reached, refuses the credentials or the query."""
    client, session = client_for(source)
    query = study_query(cfg)
    message = None
    try:
        def search(limit: int, offset: int) -> list:
            return client.search_for_studies(search_filters=dict(query), limit=limit, offset=offset,
                                             fields=["StudyInstanceUID", "NumberOfStudyRelatedInstances",
                                                     "StudyDate"])

        found = list_all(search, cfg.page_size)
    except (requests.RequestException, ValueError) as err:
        message = _search_error(source, err)
    finally:
        session.close()
    if message is not None:
        raise message  # outside the except block: no chained exception holds the request's headers
    warnings = []
    encoded = sorted(k for k, v in query.items() if quote_plus(v) != v)
    if not found and encoded:
        warnings.append(f"no study matched; the values of {', '.join(encoded)} hold characters sent percent-encoded "
                        "(wildcards, spaces), which some servers do not decode (Orthanc 1.10 with DICOMweb 1.7 "
                        "matches nothing then): try the filter without them")
    return found, warnings


def list_all(search: Callable[[int, int], list], page_size: int) -> list[StudyRef]:
    """Every study ``search(limit, offset)`` lists, page by page. A page that repeats studies,
    or an empty page after full ones, is not taken at its word: some servers get the offset
    wrong (Orthanc 1.10's DICOMweb plugin, under ModalitiesInStudy, answers an offset past the
    first page with nothing, and without a limit ignores it), so the list is then asked for
    again from the start with a limit that doubles until the answer is shorter than it."""
    found: dict[str, StudyRef] = {}

    def take(page: list) -> int:
        fresh = [ref for ref in map(_study_ref, page) if ref is not None and ref.uid not in found]
        found.update((ref.uid, ref) for ref in fresh)
        return len(fresh)

    offset = 0
    while True:
        page = search(page_size, offset)
        fresh = take(page)
        if fresh == len(page) == page_size:
            offset += page_size
            continue
        if fresh == len(page) and (page or offset == 0):  # a short page of new studies: the end
            return list(found.values())
        break
    limit = len(found) + 1
    while True:
        page = search(limit, 0)
        if not take(page) or len(page) < limit:  # nothing new in a full answer: nothing more to ask for
            return list(found.values())
        limit *= 2


def _study_ref(item: dict) -> StudyRef | None:
    """The study UID and instance count of one QIDO-RS answer; nothing else of it is kept."""
    if not isinstance(item, dict):
        return None
    uid = (item.get(_STUDY_UID, {}).get("Value") or [None])[0]
    count = (item.get(_N_INSTANCES, {}).get("Value") or [None])[0]
    if not isinstance(uid, str) or not uid:
        return None
    day = (item.get(_STUDY_DATE, {}).get("Value") or [None])[0]
    day = day if isinstance(day, str) and len(day) == 8 and day.isdigit() else None
    try:
        return StudyRef(uid, int(count) if count is not None else None, day)
    except (TypeError, ValueError):
        return StudyRef(uid, None, day)
