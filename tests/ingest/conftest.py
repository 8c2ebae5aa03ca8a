"""Fixtures of the ingestion tests: a real Orthanc PACS holding the session's cohort."""

from __future__ import annotations

import pytest
from orthanc import remove, start_orthanc


@pytest.fixture(scope="session")
def pacs(cohort, tmp_path_factory):
    """Orthanc (DICOMweb on, basic auth) with every file of the synthetic cohort uploaded;
    skips where Orthanc or its DICOMweb plugin is not installed."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        server.upload(sorted((cohort / "dicom").rglob("*.dcm")))
        yield server
    finally:
        remove(server)
