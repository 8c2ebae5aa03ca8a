"""DICOM discovery, view classification, clip extraction and the clip store."""

from importlib import import_module

__all__ = ["ClipConfig", "ClipStore", "IngestConfig", "IngestReport", "ingest"]

_HOME = {
    "ClipStore": "indexer.clip_store",
    "ClipConfig": "indexer.config",
    "IngestConfig": "indexer.config",
    "IngestReport": "indexer.ingestion",
    "ingest": "indexer.ingestion",
}


def __getattr__(name: str):
    # Lazy: ingest workers import indexer.* without pulling in lancedb, whose native
    # runtime must not be inherited by forked processes.
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
