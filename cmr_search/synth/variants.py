"""Harder variants of a generated cohort, for testing what ingestion does without help."""

from __future__ import annotations

from pathlib import Path

import pydicom

__all__ = ["strip_view_names"]


def strip_view_names(src: Path, dst: Path, n_studies: int | None = None) -> None:
    """Copy a DICOM tree with every SeriesDescription replaced by 'Series N', ProtocolName
    removed and folders renamed, so that only the plane geometry tells the view."""
    studies = sorted(p for p in Path(src).iterdir() if p.is_dir())[:n_studies]
    for i, study in enumerate(studies):
        for j, series in enumerate(sorted(p for p in study.iterdir() if p.is_dir())):
            out = Path(dst) / f"s{i:04d}" / f"x{j:03d}"
            out.mkdir(parents=True)
            for f in sorted(series.glob("*.dcm")):
                ds = pydicom.dcmread(f)
                ds.SeriesDescription = f"Series {ds.get('SeriesNumber', j)}"
                if "ProtocolName" in ds:
                    del ds.ProtocolName
                ds.save_as(out / f.name)
