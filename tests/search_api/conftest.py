"""Search-service fixtures: the session's ingested store with a tiny trained encoder, its
embeddings and an LVEF head; clients over it with read and write keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from api_data import copy_api, open_api
from tiny_models import tiny_encoder_config


@pytest.fixture(scope="session")
def api_store(ingested, tmp_path_factory) -> tuple[Path, str]:
    """A store with clips, a 1-step tiny encoder, its embeddings and a registered MIL LVEF head."""
    from encoder.embed import embed_store
    from encoder.train import Trainer
    from heads import HeadConfig, train_head

    store, _ = ingested
    root = tmp_path_factory.mktemp("api") / "store"
    shutil.copytree(store.root, root)
    trained = Trainer(root, tiny_encoder_config(), run_dir=root / "encoders" / "runs" / "t", progress=False,
                      log=lambda *_: None).fit(max_steps=1)
    embed_store(root, trained.checkpoint, progress=False)
    train_head(root, ["lvef"], HeadConfig(kind="mil", max_epochs=3), model_id=trained.model_id, name="lvef-mil")
    return root, trained.model_id


@pytest.fixture(scope="module")
def api(api_store):
    """A read-mostly app shared by a module (tests that write use ``private_api``)."""
    root, model_id = api_store
    handle = open_api(root, model_id)
    with handle.client:
        yield handle


@pytest.fixture()
def private_api(api_store, tmp_path):
    """An app over a private copy of the store, for tests that upload or delete."""
    handle = copy_api(api_store, tmp_path)
    with handle.client:
        yield handle


@pytest.fixture(scope="session")
def new_study(tmp_path_factory) -> Path:
    """The DICOM folder of one synthetic study that is not in the store."""
    from evals.synth import generate_cohort

    out = tmp_path_factory.mktemp("new-study")
    generate_cohort(1, out, seed=4242, workers=1, progress=False)
    return next((out / "dicom").iterdir())
