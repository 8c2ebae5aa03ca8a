"""Typed ingestion options; the CLI fills them from flags and passes them down."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ClipConfig", "IngestConfig"]


@dataclass(frozen=True)
class ClipConfig:
    """Shape of a canonical clip; fixed per store, since every clip must stack with the others."""

    frames: int = 16  # frames sampled uniformly over one cardiac cycle
    size: int = 128  # output is size x size pixels (224 for the published MViT-B)
    fov_mm: float = 240.0  # square field of view around the image centre
    low_percentile: float = 0.5  # robust intensity window per clip: this percentile -> 0
    high_percentile: float = 99.5  # ... and this one -> 255

    def to_dict(self) -> dict:
        """Plain dict for the store's metadata file."""
        return asdict(self)


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
