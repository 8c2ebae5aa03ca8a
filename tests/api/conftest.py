"""Search-service fixtures: clients over the session's trained store (tests/conftest.py) with
read and write keys, and a new study to upload."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_data import copy_api, open_api


@pytest.fixture(scope="module")
def api(trained_store):
    """A read-mostly app shared by a module (tests that write use ``private_api``)."""
    root, model_id = trained_store
    handle = open_api(root, model_id)
    with handle.client:
        yield handle


@pytest.fixture()
def private_api(trained_store, tmp_path):
    """An app over a private copy of the store, for tests that upload or delete."""
    handle = copy_api(trained_store, tmp_path)
    with handle.client:
        yield handle


@pytest.fixture(scope="session")
def new_study(tmp_path_factory) -> Path:
    """The DICOM folder of one synthetic study that is not in the store."""
    from cmr_search.synth import generate_cohort

    out = tmp_path_factory.mktemp("new-study")
    generate_cohort(1, out, seed=4242, workers=1, progress=False)
    return next((out / "dicom").iterdir())
