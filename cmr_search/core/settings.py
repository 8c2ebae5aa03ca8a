"""Settings read from the environment (prefix ``CMR_``) and passed down explicitly."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Process-wide settings; the CLI builds one and hands its fields down."""

    model_config = SettingsConfigDict(env_prefix="CMR_", extra="ignore")

    #: the local state folder of a store on object storage (``CMR_STORE=s3://...``): its
    #: store.json, salt, tombstones, encoders, indexes, caches; default
    #: ``~/.cache/cmr/stores/<scheme>/<bucket>/<prefix>`` (``core.location``)
    state_dir: Path | None = None
    #: default store directory when ``--store`` is not given; an object-storage URI
    #: (``s3://bucket/prefix``) becomes its state folder here, bound to the URI
    store: Path | None = None
    #: secret salt for patient keys; when unset, the store keeps its own random salt in
    #: ``DIR/secrets/patient_salt`` (set it for real archives so keys match across stores)
    patient_salt: SecretStr | None = None
    #: worker processes for ingestion; None = number of CPU cores
    workers: int | None = None
    #: OpenMP threads FAISS may use per process; None = all cores (set it to cores / workers
    #: when several processes or threads search at once, so they do not oversubscribe)
    index_threads: int | None = None
    #: where searches run: auto (a GPU when faiss or torch sees one), cpu, cuda
    index_device: str = "auto"
    #: IVF lists visited per query: more is slower and finds more of the true neighbours
    #: (docs/BENCHMARKS.md: 24 -> recall@10 0.955-0.963, 32 -> 0.968-0.977 at 1M rows)
    index_nprobe: int = 32
    #: how a query finds its IVF lists: hnsw (a graph over the centroids) or flat (scan them all)
    index_quantizer: str = "hnsw"

    @field_validator("store", mode="before")
    @classmethod
    def _store_root(cls, value, info: ValidationInfo):
        """An object-storage URI as its local state folder (``Path`` would mangle ``s3://``)."""
        from cmr_search.core.exceptions import CmrError
        from cmr_search.core.location import store_root

        if not isinstance(value, str) or "://" not in value:
            return value
        try:
            return store_root(value, info.data.get("state_dir"))
        except CmrError as error:  # pydantic reports a ValueError as a bad setting, with its text
            raise ValueError(str(error)) from None
