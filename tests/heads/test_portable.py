"""Heads move between stores: one exported file carries the weights, the card and the
encoder's model_id; another store imports it, says which model to embed with, then predicts
and evaluates with it exactly as the store it was trained in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from store_data import copy_store

from cmr_search.core.exceptions import InputError
from cmr_search.encoder import embed_store
from cmr_search.heads import HeadRegistry, evaluate_head, predict_head

CMR = [sys.executable, "-m", "cmr_search.cli"]
ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


@pytest.fixture()
def site_b(ingested, tmp_path):
    """Another store of the same studies, without any encoder."""
    return copy_store(ingested[0].root, tmp_path / "b")


def _cmr(*args):
    return subprocess.run([*CMR, *map(str, args)], capture_output=True, text=True, env=ENV, check=False)


def test_a_head_exported_from_one_store_predicts_in_another(trained_store, site_b, tmp_path):
    root_a, model_id = trained_store
    out = _cmr("heads", "export", "lvef-mil", "--out", tmp_path, "--store", root_a)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "lvef-mil.head.safetensors"
    assert path.exists() and model_id in out.stderr

    out = _cmr("heads", "import", path, "--store", site_b, "--name", "lvef-a")
    assert out.returncode == 0 and f"no embeddings of model {model_id}" in out.stderr, out.stderr
    card = HeadRegistry(site_b).card("lvef-a")
    assert card["model_id"] == model_id and card["imported_from"] == path.name and card["labels"] == ["lvef"]
    # before B holds the encoder's embeddings, predicting says which model to embed with
    with pytest.raises(InputError, match=f"embeddings of model {model_id}.*cmr embed"):
        evaluate_head(site_b, "lvef-a")

    embed_store(site_b, root_a / "encoders" / model_id, progress=False)
    studies = _uids(root_a, model_id)
    in_a = {r["study_uid"]: r["prediction"]["lvef"] for r in predict_head(root_a, "lvef-mil", studies)}
    in_b = {r["study_uid"]: r["prediction"]["lvef"] for r in predict_head(site_b, "lvef-a", studies)}
    assert in_a.keys() == in_b.keys() and np.allclose(list(in_a.values()), [in_b[u] for u in in_a], atol=1e-5)
    # scored on B's labels (the CLI reads them from B's label table)
    out = _cmr("heads", "evaluate", "--head", "lvef-a", "--store", site_b, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["metrics"]["lvef"]["n"] > 0


def _uids(root, model_id):
    from cmr_search.store.embedding_store import EmbeddingStore

    return EmbeddingStore.open(root).study_rows(model_id, ["study_uid"])["study_uid"].to_pylist()


def test_import_refuses_what_is_not_a_head_file_and_an_existing_name(trained_store, tmp_path):
    root_a, _ = trained_store
    store = copy_store(root_a, tmp_path / "a")
    bogus = tmp_path / "x.head.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a head file"):
        HeadRegistry(store).import_file(bogus)
    with pytest.raises(InputError, match="does not exist"):
        HeadRegistry(store).import_file(tmp_path / "nope.safetensors")
    path = HeadRegistry(store).export("lvef-mil", tmp_path / "h.safetensors")
    with pytest.raises(InputError, match="exists; pass --replace"):
        HeadRegistry(store).import_file(path)
    assert HeadRegistry(store).import_file(path, replace=True) == "lvef-mil"


def test_labels_of_another_store_say_so(trained_store, tmp_path):
    root_a, _ = trained_store
    labels = tmp_path / "other_site.csv"
    labels.write_text("study_uid,lvef\n1.2.3.4.5,55\n1.2.3.4.6,35\n")
    out = _cmr("heads", "evaluate", "--head", "lvef-mil", "--store", root_a, "--labels", labels)
    assert out.returncode == 2 and "none of the 2 studies" in out.stderr and "another store" in out.stderr
