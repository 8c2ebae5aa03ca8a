"""A short fuzzing round (the long one is benchmarks/fuzz_dicom.py): malformed DICOM of
every kind never stops an ingest, and every file is read or named with its reason."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom

from cmr_search.ingest import IngestConfig, ingest
from cmr_search.store import ClipStore
from cmr_search.synth.mutations import MUTATIONS, write_mutations


def test_mutated_files_are_read_or_named_with_a_reason(cohort, tmp_path, salt):
    sources = sorted((cohort / "dicom").rglob("*.dcm"))[::37]
    counts = write_mutations(sources, tmp_path / "in", 8 * len(MUTATIONS), seed=3)
    assert set(counts) == set(MUTATIONS) and min(counts.values()) == 8
    report = ingest([tmp_path / "in"], ClipStore.open(tmp_path / "store", create=True), IngestConfig(workers=2),
                    salt, progress=False)
    assert report.exit_code == 3 and report.files_found == sum(counts.values())
    named = {r["where"]: r["reason"] for r in report.rejected + report.skipped}
    assert all(named.values())
    assert any("symbolic link" in reason for reason in named.values())  # the folder linked to its parent
    for path in (tmp_path / "in").rglob("*.dcm"):
        if str(path) in named:
            continue
        with warnings.catch_warnings():  # not named: then pydicom, the reference reader, reads it too
            warnings.simplefilter("ignore")
            pydicom.dcmread(path, stop_before_pixels=True)
    kinds = {Path(where).parent.name for where in named if where.endswith(".dcm")}
    assert {"truncate", "not_dicom", "zero_dimensions", "huge_dimensions"} <= kinds
