"""Views that survive vendors and anonymisation: Philips' "LVOT" 3-chamber cine, a study
without descriptions, a second plane given the same view, a repeat in the same plane."""

from __future__ import annotations

import csv
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from cmr_search.ingest import IngestConfig, ingest
from cmr_search.store import ClipStore


def _study_with_every_lax_view(cohort: Path) -> tuple[Path, dict[str, Path], dict]:
    """A study folder whose 2CH, 3CH and 4CH series each have their own folder."""
    with open(cohort / "truth.csv") as fp:
        rows = list(csv.DictReader(fp))
    by_study = defaultdict(list)
    for r in rows:
        if r["kind"] == "cine" and r["superseded"] == "0":
            by_study[r["study_uid"]].append(r)
    for study in sorted((cohort / "dicom").iterdir()):
        folders = {}
        for series in sorted(p for p in study.iterdir() if p.is_dir()):
            ds = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
            folders[ds.SeriesInstanceUID] = series
        truth = {r["series_uid"]: r["view"] for r in by_study.get(ds.StudyInstanceUID, [])}
        lax = {v: folders[uid] for uid, v in truth.items() if v in ("2CH", "3CH", "4CH") and uid in folders}
        if len(lax) == 3 and len({folders[u] for u in truth if u in folders}) == len(truth):
            return study, lax, truth
    pytest.skip("no study of the cohort has one folder per long-axis series")


def _rewrite(folder: Path, out: Path, description: str | None, new_series: bool = False, later: bool = False) -> None:
    out.mkdir(parents=True)
    series_uid = generate_uid()
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if description is not None:
            ds.SeriesDescription = description
            if "ProtocolName" in ds:
                del ds.ProtocolName
        if new_series:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = int(ds.get("SeriesNumber", 1)) + 100
        if later:
            ds.SeriesTime = "235959"
        ds.save_as(out / f.name)


def _ingest(root: Path, salt) -> tuple[list[dict], object]:
    store = ClipStore.open(root / "store", create=True)
    report = ingest([root / "dicom"], store, IngestConfig(workers=1), salt, progress=False)
    return store.clip_metadata().to_pylist(), report


def _copy(study: Path, dst: Path, rename: dict[Path, str | None]) -> Path:
    out = dst / "dicom" / study.name
    for series in sorted(p for p in study.iterdir() if p.is_dir()):
        if series in rename:
            _rewrite(series, out / series.name, rename[series])
        else:
            shutil.copytree(series, out / series.name)
    return out


def test_philips_lvot_cine_is_the_three_chamber_view(cohort, tmp_path, salt):
    study, lax, _ = _study_with_every_lax_view(cohort)
    _copy(study, tmp_path, {lax["3CH"]: "LVOT CINE SENSE", lax["4CH"]: "4CH CINE SENSE", lax["2CH"]: "2CH CINE SENSE"})
    clips, _ = _ingest(tmp_path, salt)
    three = [c for c in clips if c["series_description"] == "LVOT CINE SENSE"]
    assert [(c["view"], c["view_source"]) for c in three] == [("3CH", "description+geometry")]


def test_an_lvot_view_beside_a_three_chamber_view_stays_lvot(cohort, tmp_path, salt):
    study, lax, _ = _study_with_every_lax_view(cohort)
    out = _copy(study, tmp_path, {})
    _rewrite(lax["3CH"], out / "extra_lvot", "LVOT cine", new_series=True)
    clips, _ = _ingest(tmp_path, salt)
    views = Counter(c["view"] for c in clips if c["series_description"] == "LVOT cine")
    assert views == {"LVOT": 1}
    assert Counter(c["view"] for c in clips)["3CH"] == 1


def test_without_descriptions_every_cine_is_kept_with_its_view(cohort, tmp_path, salt):
    study, _lax, truth = _study_with_every_lax_view(cohort)
    named, _ = _ingest(_copy_whole(study, tmp_path / "named"), salt)
    series = sorted(p for p in study.iterdir() if p.is_dir())
    blank, report = _ingest(_copy_blank(study, series, tmp_path / "blank"), salt)
    assert len(blank) == len(named)  # nothing dropped as superseded
    assert not [s for s in report.skipped if "superseded" in s["reason"]]
    got = {c["series_uid"]: c["view"] for c in blank}
    lax_truth = {u: v for u, v in truth.items() if v in ("2CH", "3CH", "4CH")}
    assert {u: got[u] for u in lax_truth} == lax_truth
    assert all(c["view_source"].startswith("geometry") for c in blank)


def _copy_whole(study: Path, root: Path) -> Path:
    shutil.copytree(study, root / "dicom" / study.name)
    return root


def _copy_blank(study: Path, series: list[Path], root: Path) -> Path:
    for i, s in enumerate(series):  # an anonymising export: no description, no protocol, numbered folders
        _rewrite(s, root / "dicom" / "anon" / f"{i:03d}", "")
    return root


def test_a_second_plane_with_the_same_view_is_kept_and_a_same_plane_repeat_replaced(cohort, tmp_path, salt):
    study, lax, _ = _study_with_every_lax_view(cohort)
    out = _copy(study, tmp_path, {})
    _rewrite(lax["2CH"], out / "second_4ch", "cine 4CH extra", new_series=True)  # another plane called 4CH
    _rewrite(lax["4CH"], out / "repeat_4ch", "cine 4CH repeat", new_series=True, later=True)  # the same plane again
    clips, report = _ingest(tmp_path, salt)
    by_desc = {c["series_description"]: c for c in clips}
    assert by_desc["cine 4CH extra"]["view"] == "4CH" and "duplicate" in by_desc["cine 4CH extra"]["view_source"]
    assert "cine 4CH repeat" in by_desc  # the later acquisition of the plane is kept ...
    superseded = [s for s in report.skipped if "superseded" in s["reason"]]
    assert len(superseded) == 1 and "same plane" in superseded[0]["reason"]  # ... the first one replaced, and said
    assert any("different planes" in w for w in report.warnings)


def test_three_long_axis_planes_are_named_by_their_order_from_the_septum():
    """A heart rotated 20 degrees from the prior: thresholds call the 4-chamber plane 3CH,
    the planes' order around the long axis does not."""
    import numpy as np

    from cmr_search.ingest.series import _order_long_axis_planes, _Slice
    from cmr_search.ingest.views import APEX_PRIOR, SEPTUM_PRIOR, lax_view_from_geometry

    axis = -APEX_PRIOR
    septum = SEPTUM_PRIOR - SEPTUM_PRIOR.dot(axis) * axis
    septum /= np.linalg.norm(septum)
    across = np.cross(axis, septum)

    def plane(deg):  # normal rotated ``deg`` from the septal direction about the long axis
        r = np.radians(deg)
        return np.cos(r) * septum + np.sin(r) * across

    slices = [_Slice(None, [], plane(d), 0.0, view=lax_view_from_geometry(plane(d), axis), view_source="geometry")
              for d in (15, 40, 62)]
    assert [s.view for s in slices] == ["2CH", "3CH", "3CH"]
    _order_long_axis_planes(slices, axis)
    assert [s.view for s in slices] == ["2CH", "3CH", "4CH"]
