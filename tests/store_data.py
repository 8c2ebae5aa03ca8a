"""Test data of the indexer tests: embedding stores filled with clustered unit vectors (no
encoder needed), and the real DICOM files of pydicom and pydicom-data. Its own module name:
`conftest` is ambiguous across test folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore


def real_dicom_dirs() -> list[Path]:
    """pydicom's own test files and the PyPI package pydicom-data's (real MR of several
    vendors, multi-frame, compressed, big endian, broken)."""
    import pydicom

    dirs = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the PyPI package pydicom-data

        dirs.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return dirs


#: files the store never rewrites in place: Lance data files (a write adds new ones),
#: model weights and training state (written in a temporary folder, then renamed)
IMMUTABLE = (".lance", ".safetensors", ".pt")


def _link_or_copy(src: str, dst: str) -> None:
    if src.endswith(IMMUTABLE):
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system: copy
            pass
    shutil.copy2(src, dst)


def copy_store(src: Path, dst: Path) -> Path:
    """A private copy of a test store that a test may write into. Immutable files are hard
    links: a store with an encoder is ~230 MB, most of it the text tower's weights, and a
    full test run copies one several dozen times (the CI machine's disk filled up)."""
    return Path(shutil.copytree(src, dst, copy_function=_link_or_copy))


MODEL = "m-test"
VIEWS = ["4CH", "2CH", "3CH", "SAX", "SAX", "SAX"]


def clustered(n: int, dim: int = 512, clusters: int = 8, spread: float = 0.6, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few fixed random centres (neighbours are meaningful, unlike
    uniform noise); ``seed`` draws the points, so queries come from the data's distribution."""
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def study_rows(n: int, seed: int = 0, model_id: str = MODEL, start: int = 0, site: str | None = None) -> list[dict]:
    """Study rows with vectors; every 3rd patient has two studies; every 10th study is site 'B'."""
    vectors = clustered(n, seed=seed)
    rows = []
    for j in range(n):
        i = start + j
        rows.append({
            "study_uid": f"1.2.826.0.1.{i}", "patient_key": f"pk{i // 2 if i % 6 in (0, 1) else i + 100000}",
            "model_id": model_id, "vector": vectors[j].tolist(), "views_present": sorted(set(VIEWS)),
            "n_views": len(VIEWS), "sex": "F" if i % 2 else "M", "age": float(20 + i % 60),
            "site": site or ("B" if i % 10 == 0 else "A"), "vendor": "SIEMENS", "study_date": f"2020{1 + i % 12:02d}01",
        })
    return rows


def view_rows(studies: list[dict], seed: int = 1) -> list[dict]:
    """Six views per study, each near its study vector."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in studies:
        for j, view in enumerate(VIEWS):
            v = np.asarray(s["vector"]) + 0.3 * rng.standard_normal(512) / np.sqrt(512)
            rows.append({
                "clip_id": f"{s['study_uid']}-{j}", "study_uid": s["study_uid"], "patient_key": s["patient_key"],
                "view": view, "slice_index": j - 3 if view == "SAX" else None, "model_id": s["model_id"],
                "vector": (v / np.linalg.norm(v)).tolist(), **{k: s[k] for k in ("sex", "age", "vendor", "site", "study_date")},
            })
    return rows


def make_store(root: Path, n: int = 300, seed: int = 0, views: bool = True) -> EmbeddingStore:
    """A store directory with ``n`` studies (and their views) of model ``MODEL``."""
    store = EmbeddingStore(ClipStore.open(root, create=True))
    studies = study_rows(n, seed)
    store.upsert_studies(studies)
    if views:
        store.upsert_views(view_rows(studies))
    return store


def exact_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k ids by inner product (the reference for recall)."""
    order = np.argsort(-(vectors @ query), kind="stable")[:k]
    return ids[order]
