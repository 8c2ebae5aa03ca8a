"""Settings read from the environment (prefix ``CMR_``) and passed down explicitly."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Process-wide settings; the CLI builds one and hands its fields down."""

    model_config = SettingsConfigDict(env_prefix="CMR_", extra="ignore")

    #: default store directory when ``--store`` is not given
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
