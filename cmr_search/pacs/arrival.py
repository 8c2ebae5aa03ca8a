"""A batch of new DICOM made searchable: ingested into the store, then embedded with the
store's default model, the two steps ``cmr ingest`` and ``cmr embed`` do by hand."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from cmr_search.core.layout import StoreLayout

__all__ = ["ArrivalReport", "ingest_and_embed"]

log = logging.getLogger(__name__)


@dataclass
class ArrivalReport:
    """What one arrival did: the ingest's counts and the embedding of what it added."""

    studies: int  # studies with clips written or replaced
    clips_written: int
    rejected: list[dict] = field(default_factory=list)  # each rejected input with its reason (no path)
    clips_embedded: int = 0
    model_id: str | None = None  # the model it was embedded with (None: the store has none yet)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able summary (no patient identifier: study UIDs are not one)."""
        return dict(self.__dict__)


def ingest_and_embed(root: Path, paths: list[Path], patient_salt=None, workers: int = 1, site: str = "",
                     progress: bool = False, index_config=None, calling_ae: str | None = None) -> ArrivalReport:
    """Ingest the DICOM under ``paths`` into the store at ``root`` (created with the default
    clip shape if new) and embed the new clips with the store's default model, so the
    studies are searchable when it returns. Idempotent like its two steps: what is already
    stored and embedded is not written again. The studies' source is a DICOM push from
    ``calling_ae``, by default the AE the listener noted in the arrival folder."""
    from cmr_search.encoder.embed import embed_store
    from cmr_search.encoder.registry import EncoderRegistry
    from cmr_search.ingest import IngestConfig
    from cmr_search.ingest.pipeline import ingest_into
    from cmr_search.store.clip_store import ClipStore
    from cmr_search.store.config import ClipConfig
    from cmr_search.store.sources import Origin

    started = time.monotonic()
    layout = StoreLayout(root)
    # an existing store keeps its own clip shape; a new one gets the default
    clip = ClipStore.open(root).clip_config if layout.meta.exists() else ClipConfig()
    if calling_ae is None:
        calling_ae = next((c for c in map(_caller_of, paths) if c), None)
    report = ingest_into(paths, root, IngestConfig(clip=clip, workers=workers, site=site), patient_salt,
                         progress=progress, origin=Origin.push(calling_ae))
    written = report.clips_inserted + report.clips_updated
    out = ArrivalReport(report.studies_written, written, report.to_dict(with_paths=False)["rejected"])
    model_id = EncoderRegistry(root).default or layout.latest_model_id()
    if model_id is None:
        log.info("ingested %d studies; the store has no encoder yet, so they are not embedded", out.studies)
    elif written:
        embedded = embed_store(root, layout.encoder(model_id), progress=progress, index_config=index_config,
                               set_default=False)
        out.clips_embedded, out.model_id = embedded.clips_embedded, model_id
    out.seconds = time.monotonic() - started
    return out


def _caller_of(folder: Path) -> str | None:
    """The calling AE title the listener noted in an arrival folder, if it is one."""
    try:
        return StoreLayout.arrival_caller(folder).read_text().strip() or None
    except OSError:  # not an arrival folder (a file, or a folder from elsewhere)
        return None
