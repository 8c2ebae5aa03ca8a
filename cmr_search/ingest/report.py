"""The record of one ingest run (``IngestReport``: counts, and every skipped or rejected
input with its reason) and the copy of it kept in the store, file paths withheld."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmr_search.core.layout import StoreLayout

__all__ = ["IngestReport", "save_report"]


@dataclass
class IngestReport:
    """What an ingest run did: counts, and every skipped or rejected input with its reason."""

    studies_listed: int | None = None  # studies a DICOMweb search listed (None: an ingest of files)
    studies_known: int = 0  # of those, already stored and not downloaded again (a sync)
    files_found: int = 0
    files_read: int = 0
    studies_found: int = 0
    studies_written: int = 0
    clips_inserted: int = 0
    clips_updated: int = 0  # stored before, now with other pixels or metadata
    clips_unchanged: int = 0  # stored before exactly so: not written again
    views: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # by design: localizers, LGE, flow, repeats
    rejected: list[dict] = field(default_factory=list)  # bad input
    reports_imported: int = 0
    labels_imported: int = 0
    warnings: list[str] = field(default_factory=list)
    # the label file's columns: "numeric" ones are labels heads and the evaluation use,
    # "text" ones are kept in the table but are no label until coded as numbers
    label_columns: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per stage: read, plan, write, tables

    @property
    def exit_code(self) -> int:
        """0 when every input was usable, 3 when some were rejected (DESIGN.md)."""
        return 3 if self.rejected else 0

    def to_dict(self, with_paths: bool = True) -> dict:
        """JSON-ready dict; without paths for the copy kept in the store (paths can name patients)."""
        d = asdict(self)
        d["exit_code"] = self.exit_code
        if not with_paths:
            for item in d["skipped"] + d["rejected"]:
                if not item["where"].startswith(("series ", "study ")):
                    item["where"] = "file (path withheld)"
        return d


def save_report(root: Path, report: IngestReport) -> Path:
    """Keep the report in the store at ``root`` (``ingest_reports/``, without file paths)."""
    folder = StoreLayout(root).ingest_reports
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = folder / f"ingest-{stamp}.json"
    path.write_text(json.dumps(report.to_dict(with_paths=False), indent=1))
    return path
