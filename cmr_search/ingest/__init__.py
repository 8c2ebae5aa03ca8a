"""DICOM ingestion: discovery, headers, series and slice planning, views, canonical clips,
and the pipeline that writes whole studies into the clip store."""

from importlib import import_module

__all__ = ["IngestConfig", "IngestReport", "ingest"]

_HOME = {
    "IngestConfig": "cmr_search.ingest.config",
    "IngestReport": "cmr_search.ingest.report",
    "ingest": "cmr_search.ingest.pipeline",
}


def __getattr__(name: str):
    # Lazy: ingest workers import cmr_search.ingest.* without pulling in lancedb, whose
    # native runtime must not be inherited by forked processes.
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'cmr_search.ingest' has no attribute {name!r}")
