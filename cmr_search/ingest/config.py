"""Typed ingestion options; the CLI fills them from flags and passes them down."""

from __future__ import annotations

from dataclasses import dataclass

from cmr_search.store.config import ClipConfig

__all__ = ["IngestConfig"]


@dataclass(frozen=True)
class IngestConfig:
    """How ``cmr ingest`` runs."""

    clip: ClipConfig = ClipConfig()
    min_frames: int = 8  # fewer frames per slice than this is not a usable cine
    workers: int = 1  # processes for header and pixel work, this one included
    allow_partial: bool = False  # write a study even when one of its cine series failed
    site: str = ""  # free-text site label stored with every clip
    studies_per_commit: int = 16  # whole studies per Lance commit (one atomic write each)
    max_files_per_unit: int = 1000  # files a worker holds in memory at once (one folder at most)
    # run on Ray instead of a process pool: "local" starts a cluster of this machine,
    # "auto" joins the running one, else its address (ingest/cluster.py)
    ray: str | None = None
