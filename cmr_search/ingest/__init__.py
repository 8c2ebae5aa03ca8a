"""DICOM ingestion: discovery, headers, series and slice planning, views, canonical clips,
and the pipeline that writes whole studies into the clip store."""

from cmr_search.core.lazy import lazy_exports

__all__ = ["IngestConfig", "IngestReport", "ingest"]

_HOME = {
    "IngestConfig": "cmr_search.ingest.config",
    "IngestReport": "cmr_search.ingest.report",
    "ingest": "cmr_search.ingest.pipeline",
}

__getattr__ = lazy_exports(__name__, _HOME)
