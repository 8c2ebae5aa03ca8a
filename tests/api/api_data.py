"""Helpers of the search-service tests: an app over a store with a key of each role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from store_data import copy_store

from cmr_search.api.app import create_app
from cmr_search.api.auth import KeyRing
from cmr_search.api.settings import ServeSettings


@dataclass
class Api:
    """A running app (in process) over one store, with a key of each role."""

    client: TestClient
    root: Path
    model_id: str
    read: dict
    write: dict


def copy_api(trained_store: tuple[Path, str], folder: Path, **settings) -> Api:
    """An app over a private copy of the test store in ``folder`` (for tests that write)."""
    root, model_id = trained_store
    dst = Path(folder) / "store"
    copy_store(root, dst)
    return open_api(dst, model_id, **settings)


def open_api(root: Path, model_id: str, **settings) -> Api:
    """An app over ``root`` with fresh read and write keys (use as a context manager's body)."""
    ring = KeyRing(root)
    read_key, _ = ring.create("read", "tests")
    write_key, _ = ring.create("write", "tests")
    app = create_app(ServeSettings(store=root, cluster_min_size=2, **settings), warm_in_background=False)
    return Api(TestClient(app), root, model_id, {"Authorization": f"Bearer {read_key}"},
               {"Authorization": f"Bearer {write_key}"})
