"""Typed options of the store: the clip shape fixed per store, how its FAISS indexes are built and searched."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ingest workers import this module; pydantic is no use to them
    from cmr_search.core.settings import Settings

__all__ = ["ClipConfig", "IndexConfig"]


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
class IndexConfig:
    """How an index is built and searched (defaults measured in docs/BENCHMARKS.md)."""

    exact_below: int = 20_000  # rows; exact (Flat) below, IVF-Flat at and above (exact at 50k: 11 ms a query)
    nlist: int | None = None  # IVF lists; None = 4 * sqrt(rows), a power of two
    nprobe: int = 32  # IVF lists visited per query (unfiltered): recall@10 0.97 at 1M rows, measured
    quantizer: str = "hnsw"  # how a query finds its IVF lists: hnsw (HNSW32 graph) | flat (scan every centroid)
    quantizer_ef: int = 64  # HNSW quantizer search depth; at 1M it cut p50 by 29 % at the same recall
    parallel_mode: int = 1  # FAISS IVF: 1 splits one query's lists over the threads (latency), 0 splits a batch's queries
    train_per_list: int = 40  # k-means training vectors per list (a sample, not all rows)
    kmeans_iters: int = 10  # k-means iterations when training IVF lists
    rebuild_fraction: float = 0.3  # a difference touching more rows than this share rebuilds
    regrow_factor: float = 4.0  # an IVF whose row count grew this much since training is retrained
    device: str = "auto"  # auto (GPU when present) | cpu | cuda
    threads: int | None = None  # OpenMP threads for FAISS; None = leave FAISS' default (all cores)
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexConfig:
        """The index configuration the ``CMR_INDEX_*`` settings ask for."""
        return cls(threads=settings.index_threads, device=settings.index_device, nprobe=settings.index_nprobe,
                   quantizer=settings.index_quantizer)
