"""Encoder fixtures: a private copy of the ingested test store and a tiny model config."""

from __future__ import annotations

import pytest
from store_data import copy_store
from tiny_models import tiny_encoder_config


@pytest.fixture()
def enc_store(ingested, tmp_path):
    """A private copy of the session's ingested store (encoder tests write into it)."""
    store, _ = ingested
    dst = tmp_path / "store"
    copy_store(store.root, dst)
    return dst


@pytest.fixture()
def tiny_cfg():
    """The CPU configuration made smaller still, so a training step takes well under a second."""
    return tiny_encoder_config()


@pytest.fixture()
def tiny_cfg_file(tiny_cfg, tmp_path):
    """The tiny config as a named JSON file (what the CLI takes)."""
    import json

    path = tmp_path / "tiny.json"
    data = tiny_cfg.to_dict()
    data.pop("name")
    path.write_text(json.dumps(data))
    return path
