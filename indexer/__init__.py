"""DICOM discovery, view classification, clip extraction and the clip store."""

from indexer.clip_store import ClipStore
from indexer.config import ClipConfig, IngestConfig
from indexer.ingest import IngestReport, ingest

__all__ = ["ClipStore", "ClipConfig", "IngestConfig", "IngestReport", "ingest"]
