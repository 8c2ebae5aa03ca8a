"""With uninformative series descriptions and folder names, views come from geometry."""

from __future__ import annotations

import pytest

from cmr_search.ingest import IngestConfig, ingest
from cmr_search.store import ClipStore
from cmr_search.synth.variants import strip_view_names


@pytest.fixture(scope="module")
def renamed_store(cohort, tmp_path_factory, salt):
    root = tmp_path_factory.mktemp("renamed")
    strip_view_names(cohort / "dicom", root / "dicom", n_studies=6)
    store = ClipStore.open(root / "store", create=True)
    report = ingest([root / "dicom"], store, IngestConfig(workers=2), salt, progress=False)
    return store, report


def test_views_from_geometry(renamed_store, truth):
    store, _report = renamed_store
    view_of = {r["series_uid"]: r["view"] for r in truth if r["kind"] == "cine"}
    clips = store.clip_metadata().to_pylist()
    assert clips and all(c["view_source"] == "geometry" for c in clips)
    # without its description a flow magnitude series looks like a cine: it may come in, as OTHER
    others = [c for c in clips if c["series_uid"] not in view_of]
    assert all(c["view"] == "OTHER" for c in others)
    clips = [c for c in clips if c["series_uid"] in view_of]
    sax = [c for c in clips if view_of[c["series_uid"]] == "SAX"]
    lax = [c for c in clips if view_of[c["series_uid"]] != "SAX"]
    sax_acc = sum(c["view"] == "SAX" for c in sax) / len(sax)
    lax_acc = sum(c["view"] == view_of[c["series_uid"]] for c in lax) / len(lax)
    print(f"geometry fallback: SAX {sax_acc:.3f} (n={len(sax)}), long axis {lax_acc:.3f} (n={len(lax)})")
    assert sax_acc == 1.0
    assert lax_acc >= 0.9
