"""Settings of the search service: ``CMR_*`` environment variables, optionally a ``.env``
style file (``cmr serve --config FILE``), then command-line flags; built once and passed down."""

from __future__ import annotations

from string import Formatter
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from cmr_search.core.settings import Settings

__all__ = ["URI_CHECK_INTERVAL_S", "ServeSettings", "check_viewer_template", "viewer_link"]

MiB = 1024 * 1024
#: the service's default freshness check interval (seconds) for a store on object storage
URI_CHECK_INTERVAL_S = 1.0


def check_viewer_template(template: str) -> str:
    """A viewer URL template as given, or ValueError unless ``{study_uid}`` is its one
    placeholder (no other field, no format spec or conversion) and it is an http(s) URL."""
    fields = []
    try:
        for _, name, spec, conversion in Formatter().parse(template):
            if name is not None:
                fields.append((name, spec, conversion))
    except ValueError as err:  # an unmatched brace
        raise ValueError(f"viewer_url {template!r} is not a valid template ({err}); write literal braces as "
                         "{{ and }}") from None
    others = sorted({"{" + n + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                     for n, spec, conv in fields if n != "study_uid" or spec or conv})
    if others or not fields:
        raise ValueError(f"viewer_url {template!r} may hold only the placeholder {{study_uid}}"
                         + (f", not {', '.join(others)}" if others else ", and it has none")
                         + "; e.g. http://orthanc:8042/ui/app/#/filtered-studies?StudyInstanceUID={study_uid}")
    if not template.lower().startswith(("http://", "https://")):
        raise ValueError(f"viewer_url {template!r} is not an http(s) URL; give the viewer's address")
    return template


def viewer_link(template: str | None, study_uid: str) -> str | None:
    """The viewer URL of one study (its UID URL-encoded), or None without a template."""
    return template.format(study_uid=quote(study_uid, safe="")) if template else None


class ServeSettings(Settings):
    """What ``cmr serve`` runs with (every field also as ``CMR_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="CMR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    #: uvicorn worker processes; each loads its own index and encoders (memory grows with it)
    serve_workers: int = Field(1, ge=1)
    #: threads that run searches (text and neighbours) beside the event loop, per process:
    #: each search is a short CPU-bound job under the GIL, so one at a time has the lowest
    #: tail latency (measured); scale with serve_workers, not with this
    search_threads: int = Field(1, ge=1)
    #: threads for everything else that touches the store (uploads, cines, studies,
    #: predictions, clusters), per process
    serve_threads: int = Field(8, ge=1)
    #: one log line per request (method, path with query, status; never a body)
    access_log: bool = True
    #: require an API key on every endpoint but /healthz, /readyz, the page and the docs
    auth: bool = True
    #: a key to register at start (e.g. a container's env file; `cmr keys create --no-store`
    #: makes one), with its role; only its hash is written to the store
    api_key: SecretStr | None = None
    api_key_role: str = Field("read", pattern="^(read|write)$")
    #: OpenMP threads per FAISS search: 1, since requests already run side by side (the
    #: store default, all cores per search, oversubscribes them under load)
    index_threads: int | None = 1
    #: torch threads per process for the encoders; None = cores / workers (several workers
    #: each using every core made text queries 4x slower, measured)
    torch_threads: int | None = Field(None, ge=1)
    #: encoder whose embeddings are searched (default: the store's default model)
    model_id: str | None = None
    #: most results one request may ask for
    max_k: int = Field(100, ge=1, le=10_000)
    #: at most this often (seconds) a search checks that the index reflects the table; 0 =
    #: before every search (a stat of the table's version folder: other processes' writes
    #: are seen at once). Unset: 0 for a local store, ``URI_CHECK_INTERVAL_S`` (1 s) for a
    #: store on object storage, where each check is a request to it (tens of ms on S3)
    check_interval_s: float | None = Field(None, ge=0)
    #: uploads: bytes received, files, bytes after unzipping, per-member compression ratio
    max_upload_bytes: int = Field(512 * MiB, ge=1)
    max_upload_files: int = Field(5000, ge=1)
    max_unzipped_bytes: int = Field(2048 * MiB, ge=1)
    max_zip_ratio: float = Field(100.0, ge=1)
    #: cine images: webp (small, every current browser) or gif
    cine_format: str = Field("webp", pattern="^(webp|gif)$")
    #: clusters: smallest cluster HDBSCAN reports, and a cap on the studies clustered
    cluster_min_size: int = Field(10, ge=2)
    cluster_max_studies: int = Field(20_000, ge=10)
    #: a link from each study to the archive's own viewer (Orthanc, OHIF): a URL with the
    #: one placeholder {study_uid}, e.g. https://viewer/viewer?StudyInstanceUIDs={study_uid};
    #: unset, the API gives no viewer_url
    viewer_url: str | None = None

    #: keep the store in step with this DICOMweb archive in the background (`cmr sync`): one
    #: worker process runs a cycle every sync_every_s; /readyz and /metrics show its state.
    #: A token or password is read from the variable named (never given as a value here)
    sync_url: str | None = None
    sync_every_s: float = Field(60.0, ge=1.0)
    sync_token_env: str | None = None
    sync_user: str | None = None
    sync_password_env: str | None = None

    def check_interval(self, on_object_storage: bool) -> float:
        """The freshness check interval to search with: as set, else by where the tables are."""
        if self.check_interval_s is not None:
            return self.check_interval_s
        return URI_CHECK_INTERVAL_S if on_object_storage else 0.0

    @field_validator("viewer_url")
    @classmethod
    def _viewer_url(cls, value: str | None) -> str | None:
        return check_viewer_template(value.strip()) if value and value.strip() else None
