"""Embedding-store fixtures (the data helpers live in store_data.py)."""

from __future__ import annotations

import pytest
from store_data import make_store

from cmr_search.store.embedding_store import EmbeddingStore


@pytest.fixture()
def emb_store(tmp_path) -> EmbeddingStore:
    """300 studies with six views each."""
    return make_store(tmp_path / "store")


@pytest.fixture(scope="module")
def s3():
    """One moto S3 server per test module (each store takes its own bucket)."""
    from s3 import s3_server

    with s3_server() as server:
        yield server
