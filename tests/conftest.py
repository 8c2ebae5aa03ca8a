"""Shared fixtures: one tiny synthetic cohort (real DICOM), one store ingested from it, and a
copy of that store with a tiny trained encoder, its embeddings and an LVEF head."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from store_data import copy_store
from tiny_models import tiny_encoder_config

from cmr_search.ingest import IngestConfig, ingest
from cmr_search.store import ClipStore

COHORT_STUDIES = 10
COHORT_SEED = 223  # covers every vendor style, decoy, transfer syntax, repeat (see tests/evals)
SALT = b"test-salt"


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV file as dicts."""
    with open(path, newline="") as fp:
        return list(csv.DictReader(fp))


@pytest.fixture(scope="session")
def salt() -> bytes:
    """The patient-key salt used by the test stores."""
    return SALT


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A synthetic cohort of 10 studies (all vendor styles, decoys, repeats) on disk."""
    from cmr_search.synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(COHORT_STUDIES, out, seed=COHORT_SEED, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def truth(cohort) -> list[dict]:
    """The generator's per-series truth table."""
    return read_csv(cohort / "truth.csv")


@pytest.fixture(scope="session")
def ingested(cohort, tmp_path_factory):
    """The cohort ingested once into a fresh store: (store, report)."""
    root = tmp_path_factory.mktemp("store")
    store = ClipStore.open(root, create=True)
    report = ingest(
        [cohort / "dicom"], store, IngestConfig(workers=2), SALT,
        reports=cohort / "reports.csv", labels=cohort / "labels.csv", progress=False,
    )
    return store, report


@pytest.fixture(scope="session")
def trained_store(ingested, tmp_path_factory) -> tuple[Path, str]:
    """A store with clips, a 1-step tiny encoder, its embeddings and a registered MIL LVEF head."""
    from cmr_search.encoder.embed import embed_store
    from cmr_search.encoder.train import Trainer
    from cmr_search.heads import HeadConfig, train_head

    store, _ = ingested
    root = tmp_path_factory.mktemp("api") / "store"
    copy_store(store.root, root)
    trained = Trainer(root, tiny_encoder_config(), run_dir=root / "encoders" / "runs" / "t", progress=False,
                      log=lambda *_: None).fit(max_steps=1)
    embed_store(root, trained.checkpoint, progress=False)
    train_head(root, ["lvef"], HeadConfig(kind="mil", max_epochs=3), model_id=trained.model_id, name="lvef-mil")
    return root, trained.model_id
