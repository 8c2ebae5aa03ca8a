"""Tests of the synthetic cohort generator (evals.synth).

One small cohort (seed COHORT_SEED, COHORT_SIZE studies) is generated per test
module; its seed was chosen so that those studies cover every vendor style,
decoy kind, transfer syntax, enhanced files, Philips private phases, a repeated
acquisition and a repeat visit (test_cohort_covers_every_feature says so).
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from cmr_search.synth import (
    BINARY_LABELS,
    FINDINGS,
    LABEL_COLUMNS,
    THRESHOLDS,
    build_phantom,
    generate_cohort,
    render_plane,
    sample_study_params,
    sax_stack,
    study_appearance,
    study_labels,
    write_report,
)
from cmr_search.synth.dicom_encode import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    JPEG2000_LOSSLESS,
    RLE_LOSSLESS,
    compress_frame,
    encapsulated_pixel_data,
    encode_elements,
    file_meta,
    file_meta_from,
    meta_template,
    native_pixel_data,
    part10,
)
from cmr_search.synth.dicom_writer import TRUTH_COLUMNS, study_identity, to_stored, write_series
from cmr_search.synth.labels import dilatation_grade
from cmr_search.synth.params import ARCHETYPES, THROMBUS_RATE_ISCHAEMIC
from cmr_search.synth.protocol import SeriesPlan, StudyProtocol
from cmr_search.synth.render import CINE
from cmr_search.synth.tissues import (
    LV_BLOOD,
    LV_MYOCARDIUM,
    RV_BLOOD,
    SCAR,
    THROMBUS,
    tissue_codes,
)

COHORT_SEED = 223
COHORT_SIZE = 10
# Simpson's rule on the rendered SAX stack against the geometric truth
TOL_LVEF_POINTS = 2.0
TOL_EDV = 0.04
TOL_ESV = 0.08
TOL_MASS = 0.05


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = generate_cohort(COHORT_SIZE, out, seed=COHORT_SEED, workers=2, progress=False)
    return out, summary


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tables(cohort):
    out, _ = cohort
    return {name: read_csv(out / f"{name}.csv") for name in ("labels", "reports", "truth")}


@pytest.fixture(scope="module")
def headers(cohort):
    """Every file of the cohort read back with pydicom, grouped by SeriesInstanceUID."""
    out, _ = cohort
    series = defaultdict(list)
    for path in sorted((out / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        series[ds.SeriesInstanceUID].append((path, ds))
    return series


def find_params(archetype: str, need=lambda p: True, start: int = 0):
    """First standalone study (rng seeded by k) of an archetype."""
    for k in range(start, start + 3000):
        p = sample_study_params(np.random.default_rng(k), study_index=k)
        if p.archetype == archetype and need(p):
            return p
    raise AssertionError(f"no {archetype} study found")


# ---------------------------------------------------------------- layout and tables


def test_layout_and_table_columns(cohort, tables):
    out, summary = cohort
    assert summary.n_studies == COHORT_SIZE
    assert list(tables["labels"][0]) == ["study_uid", *LABEL_COLUMNS]
    assert list(tables["reports"][0]) == ["study_uid", "report"]
    assert list(tables["truth"][0]) == list(TRUTH_COLUMNS)
    uids = [r["study_uid"] for r in tables["labels"]]
    assert uids == [r["study_uid"] for r in tables["reports"]] == list(summary.study_uids)
    assert len(set(uids)) == COHORT_SIZE
    assert {r["study_uid"] for r in tables["truth"]} == set(uids)
    studies = sorted(p.name for p in (out / "dicom").iterdir())
    assert studies == [f"study_{i:04d}" for i in range(COHORT_SIZE)]
    for series_dir in (out / "dicom").glob("*/*"):
        assert "ZZSYNTH" not in series_dir.name and "PATIENT" not in series_dir.name
        assert re.fullmatch(r"series_\d{3}_[A-Za-z0-9_]+|(sax|2ch|4ch)_\d+", series_dir.name)
    assert summary.n_files == sum(1 for _ in (out / "dicom").rglob("*.dcm"))
    assert "lv_thrombus" in summary.prevalence_table()


def test_cohort_covers_every_feature(tables):
    truth = tables["truth"]
    got = {
        "styles": {r["style"] for r in truth},
        "kinds": {r["kind"] for r in truth},
        "syntaxes": {r["transfer_syntax"] for r in truth},
        "enhanced": {r["enhanced"] for r in truth},
        "superseded": {r["superseded"] for r in truth},
        "sax_layout": {r["slice_index"] == "-1" for r in truth if r["view"] == "SAX"},
    }
    want = {
        "styles": {"siemens", "ge", "philips", "ukbiobank", "kaggle"},
        "kinds": {"cine", "localizer", "lge", "flow", "derived"},
        "syntaxes": {EXPLICIT_VR_LE, IMPLICIT_VR_LE, RLE_LOSSLESS, JPEG2000_LOSSLESS},
        "enhanced": {"0", "1"},
        "superseded": {"0", "1"},
        "sax_layout": {True, False},
    }
    for key, needed in want.items():
        assert needed <= got[key], f"COHORT_SEED no longer covers {key}: pick a new seed"
    views = {r["view"] for r in truth if r["kind"] == "cine"}
    assert views == {"4CH", "3CH", "2CH", "SAX"}
    assert all(r["view"] == "" and r["slice_index"] == "" for r in truth if r["kind"] != "cine")


# ---------------------------------------------------------------- DICOM content


def test_every_file_reads_back_with_pixels_and_dummy_phi(cohort, tables, headers):
    truth = {r["series_uid"]: r for r in tables["truth"]}
    assert set(headers) == set(truth)
    for series_uid, files in headers.items():
        row = truth[series_uid]
        n_frames, n_slices = int(row["n_frames"]), int(row["n_slices"])
        enhanced = row["enhanced"] == "1"
        assert len(files) == (1 if enhanced else n_frames * n_slices)
        for path, ds in files:
            assert ds.file_meta.TransferSyntaxUID == row["transfer_syntax"]
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.4.1" if enhanced
                                      else "1.2.840.10008.5.1.4.1.1.4")
            assert ds.StudyInstanceUID == row["study_uid"]
            assert ds.SeriesDescription == row["series_description"]
            assert ds.Modality == "MR" and ds.BitsAllocated == 16 and ds.BitsStored == 12
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            pixels = ds.pixel_array
            expected = ((n_frames * n_slices,) if enhanced else ()) + (ds.Rows, ds.Columns)
            assert pixels.shape == expected and pixels.max() < 4096
            assert "ZZSYNTH" in str(ds.PatientName) and ds.PatientID.startswith("ZZSYNTH-PID-")
            assert ds.AccessionNumber.startswith("ZZSYNTH") and "ZZSYNTH" in ds.InstitutionName
            assert len(ds.PatientBirthDate) == 8 and ds.StudyDate > ds.PatientBirthDate
            assert float(ds.RescaleSlope if not enhanced else ds.SharedFunctionalGroupsSequence[0]
                         .PixelValueTransformationSequence[0].RescaleSlope) > 0


def test_decoys_carry_the_cues_ingestion_skips_on(tables, headers):
    for row in tables["truth"]:
        _, ds = headers[row["series_uid"]][0]
        image_type = list(ds.ImageType)
        desc = row["series_description"].lower()
        if row["kind"] == "localizer":
            assert "LOCALIZER" in image_type or re.search(r"locali[sz]er|scout|loc", desc)
            assert int(row["n_frames"]) == 1 and int(row["n_slices"]) == 3
        elif row["kind"] == "lge":
            assert "InversionTime" in ds and int(row["n_frames"]) == 1
            assert re.search(r"lge|de_|psir", desc)
        elif row["kind"] == "flow":
            assert "flow" in desc
            if desc.endswith("_p"):
                assert "P" in image_type[2:] or "VELOCITY" in image_type
        elif row["kind"] == "derived":
            assert image_type[:2] == ["DERIVED", "SECONDARY"]
        else:
            assert image_type[0] == "ORIGINAL" and "LOCALIZER" not in image_type


def _frames_in_time_order(files):
    """(trigger key, pixel data) of a classic single-slice series, ordered by time."""
    keyed = []
    for _, ds in files:
        key = float(ds.TriggerTime) if "TriggerTime" in ds else int(ds[0x2001, 0x1008].value)
        keyed.append((key, ds))
    return sorted(keyed, key=lambda kv: kv[0])


def test_cine_timing_tags_and_ordering(tables, headers):
    rotated = private = 0
    for row in tables["truth"]:
        if row["kind"] != "cine" or row["enhanced"] == "1":
            continue
        files = headers[row["series_uid"]]
        _, ds = files[0]
        assert int(ds.CardiacNumberOfImages) == int(row["n_frames"])
        assert 600 < float(ds.NominalInterval) < 1500 and int(ds.HeartRate) > 0
        if "TriggerTime" not in ds:
            private += 1
            assert ds[0x2001, 0x0010].value == "Philips Imaging DD 001"
            assert all(d[0x2001, 0x1008].VR == "IS" for _, d in files)
        if int(row["n_slices"]) > 1:
            continue
        ordered = _frames_in_time_order(files)
        instance = [int(d.InstanceNumber) for _, d in ordered]
        rotated += instance != sorted(instance)
        times = [k for k, _ in ordered]
        assert len(set(times)) == len(times)
    assert rotated > 0, "some series must need TriggerTime to be ordered"
    assert private > 0


def test_repeated_acquisition_is_marked_and_later(tables, headers):
    superseded = [r for r in tables["truth"] if r["superseded"] == "1"]
    assert superseded
    for old in superseded:
        kept = [r for r in tables["truth"] if r["study_uid"] == old["study_uid"]
                and r["view"] == old["view"] and r["superseded"] == "0" and r["kind"] == "cine"]
        assert len(kept) == 1
        a, b = headers[old["series_uid"]][0][1], headers[kept[0]["series_uid"]][0][1]
        assert int(b.SeriesNumber) > int(a.SeriesNumber) and b.SeriesTime > a.SeriesTime


def test_repeat_visits_share_the_patient(tables, headers):
    by_patient = defaultdict(set)
    for files in headers.values():
        ds = files[0][1]
        by_patient[ds.PatientID].add((ds.StudyDate, ds.StudyInstanceUID))
    repeats = [v for v in by_patient.values() if len(v) > 1]
    assert repeats, "COHORT_SEED should include a repeat visit"
    for visits in repeats:
        assert len({d for d, _ in visits}) == len(visits)  # different days


def _plane(ds):
    iop = np.array(ds.ImageOrientationPatient, float)
    return np.array(ds.ImagePositionPatient, float), iop[:3], iop[3:], np.cross(iop[:3], iop[3:])


def test_geometry_sax_stack_and_long_axis_planes(tables, headers):
    by_study = defaultdict(lambda: defaultdict(list))
    for row in tables["truth"]:
        if row["kind"] != "cine" or row["superseded"] == "1" or row["enhanced"] == "1":
            continue
        for _, ds in headers[row["series_uid"]]:
            by_study[row["study_uid"]][row["view"]].append((row["slice_index"], ds))
    assert by_study
    for views in by_study.values():
        sax = views["SAX"]
        normal = _plane(sax[0][1])[3]
        depth = {}
        for slice_index, ds in sax:
            pos, u, v, n = _plane(ds)
            assert abs(u @ v) < 1e-6 and abs(np.linalg.norm(n) - 1) < 1e-6
            assert abs(n @ normal) > 0.9999  # parallel slices
            depth.setdefault(round(float(pos @ normal), 3), ds)
        ordered = sorted(depth)[::-1]  # the normal points to the base: base first
        gaps = np.diff(ordered)
        assert 7.0 < -gaps.mean() < 11.5 and np.ptp(gaps) < 1e-2
        if sax[0][0] != "-1":  # one series per slice: slice_index runs base -> apex
            idx = {round(float(_plane(ds)[0] @ normal), 3): int(i) for i, ds in sax}
            assert [idx[d] for d in ordered] == list(range(len(ordered)))
        else:
            assert abs(float(sax[0][1].SpacingBetweenSlices) + gaps.mean()) < 1e-3
        lax_normals = {}
        for view in ("4CH", "2CH", "3CH"):
            if view in views:
                n = _plane(views[view][0][1])[3]
                assert abs(n @ normal) < 0.12  # long-axis planes contain the LV axis
                lax_normals[view] = n
        if {"4CH", "2CH"} <= set(lax_normals):
            assert abs(lax_normals["4CH"] @ lax_normals["2CH"]) < 0.2


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(cohort, tables, tmp_path):
    out, summary = cohort
    again = generate_cohort(3, tmp_path / "again", seed=COHORT_SEED, workers=1, progress=False)
    for name in ("labels", "reports"):
        assert read_csv(tmp_path / "again" / f"{name}.csv") == tables[name][:3]
    first3 = set(again.study_uids)
    assert read_csv(tmp_path / "again" / "truth.csv") == [
        r for r in tables["truth"] if r["study_uid"] in first3]
    files = sorted((tmp_path / "again" / "dicom").rglob("*.dcm"))
    assert files
    for path in files[::25]:
        twin = out / path.relative_to(tmp_path / "again")
        assert path.read_bytes() == twin.read_bytes()
    other = generate_cohort(2, tmp_path / "other", seed=COHORT_SEED + 1, workers=1,
                            progress=False)
    assert not set(other.study_uids) & set(summary.study_uids)
    assert read_csv(tmp_path / "other" / "labels.csv")[0]["lvedv_ml"] != \
        tables["labels"][0]["lvedv_ml"]
    with pytest.raises(FileExistsError):
        generate_cohort(1, tmp_path / "other", seed=0, progress=False)


# ---------------------------------------------------------------- volumes


def _lv_center(ph, origin, row_dir, col_dir, spacing):
    """Pixel (row, col) where the LV long axis crosses an image plane."""
    ez, normal = ph.frame.axes[2], np.cross(row_dir, col_dir)
    t = np.dot(origin - ph.frame.origin, normal) / np.dot(ez, normal)
    rel = ph.frame.origin + t * ez - origin
    return round(rel @ col_dir / spacing), round(rel @ row_dir / spacing)


def blood_pool_masks(images, centers, ed_masks=None):
    """Blood-pool masks per slice (base -> apex), as a semi-automatic contouring tool.

    Threshold halfway between blood and myocardium; the connected component at
    the LV centre. At end diastole the tracking stops at the apex, where the
    component vanishes or stops shrinking (the centre then lies in epicardial
    fat); at end systole a slice's pool must lie within its end-diastolic pool
    (beyond the apex, which rises in systole, the centre lies in fat or fluid).
    """
    r0, c0 = centers[0]
    level = np.median(images[0][r0 - 2: r0 + 3, c0 - 2: c0 + 3])
    masks, prev = [], None
    for k, (img, (r, c)) in enumerate(zip(images, centers)):
        lab, _ = ndimage.label(img > 0.35 * level)  # blood and thrombus, not myocardium
        ids = np.unique(lab[r - 1: r + 2, c - 1: c + 2])
        comp = np.isin(lab, ids[ids > 0])
        if ed_masks is not None:
            ed = ndimage.binary_dilation(ed_masks[k], iterations=2)
            if (comp & ~ed).sum() > 0.1 * comp.sum():
                comp[:] = False
        elif not comp.any() or (prev is not None and comp.sum() > 1.1 * prev.sum()):
            break
        masks.append(comp & (img > 0.62 * level))
        prev = comp
    return masks + [np.zeros_like(images[0], bool)] * (len(images) - len(masks))


def _write_noise_free_sax(tmp: Path, params, ph, frames):
    """Render the SAX stack without noise or bias field and write it as one series."""
    app = study_appearance(params)
    planes = sax_stack(ph, params)
    stored = np.stack([to_stored(render_plane(ph, params, app, pl, frames, noise=False,
                                              bias=False), params.signal_gain, 1.7)
                       for pl in planes])
    proto = StudyProtocol("siemens", "SIEMENS", "MAGNETOM Aera", "syngo", 1.5, 1.7, 0.0,
                          "20200101", "090000")
    plan = SeriesPlan(kind="cine", view="SAX", slice_index=-1, planes=tuple(planes),
                      frames=tuple(int(f) for f in frames), contrast="cine",
                      description="cine_sax", series_number=5, minutes=3.0,
                      image_type=("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"),
                      folder="sax", order="slice_major")
    ident = study_identity(params, 0, proto.study_date)
    write_series(tmp / "sax", ident, proto, plan, params, stored)
    return sorted((tmp / "sax").glob("*.dcm"))


def simpson_from_dicom(files, ph):
    """EDV, ESV (ml) by Simpson's rule from DICOM read back from disk."""
    by_time = defaultdict(list)
    for path in files:
        ds = pydicom.dcmread(path)
        img = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        by_time[float(ds.TriggerTime)].append((ds, img))
    volumes, ed_masks = [], None
    for t in sorted(by_time):  # frame 0 (ED) first
        n = _plane(by_time[t][0][0])[3]
        stack = sorted(by_time[t], key=lambda di: -np.dot(_plane(di[0])[0], n))  # base first
        depths = [np.dot(_plane(ds)[0], n) for ds, _ in stack]
        gap = float(np.mean(np.abs(np.diff(depths))))
        spacing = [float(x) for x in stack[0][0].PixelSpacing]
        centers = [_lv_center(ph, _plane(ds)[0], _plane(ds)[1], _plane(ds)[2], spacing[0])
                   for ds, _ in stack]
        masks = blood_pool_masks([img for _, img in stack], centers, ed_masks)
        ed_masks = masks if ed_masks is None else ed_masks
        volumes.append(sum(m.sum() for m in masks) * spacing[0] * spacing[1] * gap / 1000.0)
    return volumes


CASES = {
    "dcm": ("dcm", lambda p: True),
    "hcm": ("hcm", lambda p: True),
    "apical_akinesis_thrombus": ("ischaemic_apical", lambda p: p.thrombus),
    "normal": ("normal", lambda p: True),
    "rv_disease": ("pulmonary_hypertension", lambda p: True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_simpson_on_rendered_dicom_matches_geometric_labels(case, tmp_path):
    params = find_params(*CASES[case])
    ph = build_phantom(params)
    labels = study_labels(params, ph.volumes)
    files = _write_noise_free_sax(tmp_path, params, ph, [0, params.es_frame])
    edv, esv = simpson_from_dicom(files, ph)
    ef = 100 * (edv - esv) / edv
    assert abs(edv - labels["lvedv_ml"]) <= TOL_EDV * labels["lvedv_ml"]
    assert abs(esv - labels["lvesv_ml"]) <= TOL_ESV * labels["lvesv_ml"]
    assert abs(ef - labels["lvef"]) <= TOL_LVEF_POINTS
    if case == "apical_akinesis_thrombus":  # the label is the geometric EF, not the target
        assert labels["lvef"] < params.lvef_target - 3


LV_ONLY = {**{k: 0.0 for k in CINE}, LV_MYOCARDIUM: 0.5, SCAR: 0.5, LV_BLOOD: 1.0,
           THROMBUS: 1.0}


@pytest.mark.parametrize("case", ["hcm", "dcm", "normal"])
def test_myocardial_mass_from_rendered_ring(case):
    """The LV drawn alone (myocardium mid-grey) and segmented by intensity."""
    params = find_params(*CASES[case])
    ph = build_phantom(params)
    app = study_appearance(params)
    planes = sax_stack(ph, params)
    ring = 0
    for pl in planes:
        img = render_plane(ph, params, app, pl, [0], contrast=LV_ONLY, noise=False,
                           bias=False, surroundings=False)[0]
        ring += int(((img > 0.25) & (img <= 0.75)).sum())
    mass = ring * pl.spacing**2 * params.sax_spacing_mm / 1000 * 1.05
    assert abs(mass - ph.volumes.lv_mass_g) <= TOL_MASS * ph.volumes.lv_mass_g


def test_volume_labels_agree_with_voxelised_shapes():
    """The integrals behind the labels against voxel counts of the rendered shapes."""
    params = find_params("ischaemic_apical", lambda p: p.thrombus)
    ph = build_phantom(params)
    h = 0.8
    reach = ph.rv_xmin + 2 * ph.rv_axes[0][0] + 2
    grid = np.mgrid[-45:reach:h, -60:60:h, -(ph.lv_length_ed + 15):1:h].reshape(3, -1).T
    codes = tissue_codes(ph, grid.astype(np.float32), np.array([0, ph.es_frame]))
    voxel = h**3 / 1000
    vol = ph.volumes
    blood = (codes == LV_BLOOD).sum(axis=1) * voxel
    assert blood[0] == pytest.approx(vol.lvedv_ml, rel=0.02)
    assert blood[1] == pytest.approx(vol.lvesv_ml, rel=0.02)
    assert (codes[0] == THROMBUS).sum() * voxel == pytest.approx(vol.thrombus_ml, rel=0.1)
    myo = (codes[0] == LV_MYOCARDIUM).sum() * voxel * 1.05
    assert myo == pytest.approx(vol.lv_mass_g, rel=0.02)
    rv = (codes == RV_BLOOD).sum(axis=1) * voxel
    assert rv[0] == pytest.approx(vol.rvedv_ml, rel=0.02)
    assert rv[1] == pytest.approx(vol.rvesv_ml, rel=0.03)


# ---------------------------------------------------------------- labels and reports


def test_binary_labels_follow_the_numbers(tables):
    t = THRESHOLDS
    for row in tables["labels"]:
        n = {k: float(row[k]) for k in LABEL_COLUMNS if k != "sex"}
        male = row["sex"] == "M"
        bsa = n["bsa_m2"]
        grade = dilatation_grade(n["lvedv_ml"] / bsa, row["sex"])
        assert int(row["lv_dilatation_grade"]) == grade
        assert int(row["lv_dilatation"]) == (grade >= 1)
        assert int(row["reduced_lvef"]) == (n["lvef"] < 40)
        hcm = n["septal_thickness_mm"] >= 15 and \
            n["septal_thickness_mm"] / n["lateral_thickness_mm"] >= 1.3
        assert int(row["hcm"]) == hcm
        cut = t.lvh_wall_mm[0 if male else 1]
        assert int(row["concentric_lvh"]) == (not hcm and min(
            n["septal_thickness_mm"], n["lateral_thickness_mm"]) >= cut)
        assert int(row["dcm"]) == (grade >= 1 and n["lvef"] < 45 and row["apical_akinesis"] == "0")
        assert int(row["rv_dilatation"]) == (n["rvedv_ml"] / bsa > t.rvedv_index_uln[0 if male else 1])
        assert int(row["rv_dysfunction"]) == (n["rvef"] < 45)
        assert int(row["la_dilatation"]) == (n["la_volume_ml"] / bsa > 50)
        assert int(row["ra_dilatation"]) == (n["ra_volume_ml"] / bsa > 55)
        assert int(row["pericardial_effusion"]) == (n["effusion_mm"] >= 5)
        assert 15 <= n["lvef"] <= 80 and n["lvesv_ml"] < n["lvedv_ml"]
        assert abs(100 * (1 - n["lvesv_ml"] / n["lvedv_ml"]) - n["lvef"]) < 0.2
        if row["lv_thrombus"] == "1":
            assert row["apical_akinesis"] == "1"


def test_archetype_prevalences_are_realistic():
    """Cheap check on 4000 parameter draws; rare labels stay rare."""
    draws = [sample_study_params(np.random.default_rng([9, k])) for k in range(4000)]
    share = {name: np.mean([p.archetype == name for p in draws]) for name, _ in ARCHETYPES}
    for name, prevalence in ARCHETYPES:
        assert abs(share[name] - prevalence) < 0.02 + 0.25 * prevalence
    thrombus = np.mean([p.thrombus for p in draws])
    expected = dict(ARCHETYPES)["ischaemic_apical"] * THROMBUS_RATE_ISCHAEMIC
    assert 0.01 < thrombus < 0.04 and abs(thrombus - expected) < 0.01
    lvef = np.array([p.lvef_target for p in draws])
    assert lvef.min() >= 15 and lvef.max() <= 75
    assert {p.vendor_style for p in draws} == {"siemens", "ge", "philips", "ukbiobank", "kaggle"}
    assert all(8 <= p.sax_slices <= 12 and 20 <= p.n_frames <= 40 for p in draws)
    assert all(1.2 <= p.pixel_spacing_mm <= 2.0 and 160 <= min(p.rows, p.cols) for p in draws)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]


KEYWORDS = {"lv_thrombus": r"thrombus", "pericardial_effusion": r"effusion",
            "hcm": r"\bhcm\b|hypertrophic cardiomyopathy|asymmetric (septal )?hypertrophy"}


def test_reports_agree_with_labels():
    omitted = 0
    for k in range(80):
        params = sample_study_params(np.random.default_rng([5, k]), study_index=k)
        labels = study_labels(params, build_phantom(params).volumes)
        report = write_report(labels, params, np.random.default_rng([6, k]))
        said = dict(report.mentions)
        for finding, present in report.mentions:
            assert bool(labels[finding]) == present, (finding, report.text)
        for finding in FINDINGS:
            if labels[finding] and finding not in report.omitted and finding != "dcm":
                assert said.get(finding) is True, (finding, report.text)
        omitted += bool(report.omitted)
        for finding, word in KEYWORDS.items():
            hits = [s for s in _sentences(report.text) if re.search(word, s.lower())]
            negated = [s for s in hits if re.match(r"(No|There is no)\b", s)]
            if labels[finding] and finding not in report.omitted:
                assert hits and not negated, report.text
            if not labels[finding]:
                assert hits == negated, report.text
    assert 0 < omitted < 30


def test_cohort_reports_quote_the_measurements(tables):
    labels = {r["study_uid"]: r for r in tables["labels"]}
    for row in tables["reports"]:
        lab = labels[row["study_uid"]]
        text = row["report"]
        assert len(_sentences(text)) >= 3
        if f"{float(lab['lvef']):.0f}%" not in text:
            assert lab["reduced_lvef"] == "1" or "LVEF" not in text
        if lab["lv_thrombus"] == "1" and "thrombus" in text:
            assert "apical" in text.lower() or "apex" in text.lower()


# ---------------------------------------------------------------- encoder


@pytest.mark.parametrize("syntax", [RLE_LOSSLESS, JPEG2000_LOSSLESS])
def test_compressed_frames_round_trip(syntax, tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4096, size=(2, 40, 56), dtype=np.uint16)
    frames[:, 10:20, 10:30] = 1234
    elements = [(0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.4.1"), (0x00080018, "UI", "1.2.3"),
                (0x00280002, "US", 1), (0x00280004, "CS", "MONOCHROME2"),
                (0x00280008, "IS", 2), (0x00280010, "US", 40), (0x00280011, "US", 56),
                (0x00280100, "US", 16), (0x00280101, "US", 12), (0x00280102, "US", 11),
                (0x00280103, "US", 0)]
    data = encode_elements(elements) + encapsulated_pixel_data(
        [compress_frame(f, syntax) for f in frames])
    path = tmp_path / "x.dcm"
    path.write_bytes(part10("1.2.840.10008.5.1.4.1.1.4.1", "1.2.3", syntax, data))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(ds.pixel_array, frames)


def test_native_implicit_vr_round_trip(tmp_path):
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4) * 300
    elements = [(0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.4"), (0x00080018, "UI", "1.2.3"),
                (0x00200032, "DS", [-12.3456789012, 1e-7, 250.0]), (0x00281053, "DS", 2.44),
                (0x00280002, "US", 1), (0x00280004, "CS", "MONOCHROME2"),
                (0x00280010, "US", 3), (0x00280011, "US", 4), (0x00280100, "US", 16),
                (0x00280101, "US", 12), (0x00280102, "US", 11), (0x00280103, "US", 0)]
    path = tmp_path / "x.dcm"
    body = encode_elements(elements, implicit=True) + native_pixel_data(frame, implicit=True)
    path.write_bytes(part10("1.2.840.10008.5.1.4.1.1.4", "1.2.3", IMPLICIT_VR_LE, body))
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(ds.pixel_array, frame)
    assert [float(x) for x in ds.ImagePositionPatient] == pytest.approx([-12.3456789, 1e-7, 250])
    assert float(ds.RescaleSlope) == 2.44


@pytest.mark.parametrize("syntax", [EXPLICIT_VR_LE, IMPLICIT_VR_LE, RLE_LOSSLESS])
def test_cached_file_meta_matches_pydicom_file_meta(syntax):
    sop_class, sop = "1.2.840.10008.5.1.4.1.1.4", "2.25.12345678901234567890123"
    for uid in (sop, sop + "4"):  # odd and even lengths
        assert file_meta_from(*meta_template(sop_class, syntax), uid) == file_meta(
            sop_class, uid, syntax)


# ---------------------------------------------------------------- slow


@pytest.mark.slow
def test_label_prevalence_table_over_300_studies(capsys):
    rows = []
    for k in range(300):
        params = sample_study_params(np.random.default_rng([11, k]), study_index=k)
        rows.append(study_labels(params, build_phantom(params).volumes))
    share = {name: np.mean([r[name] for r in rows]) for name in BINARY_LABELS}
    with capsys.disabled():
        print("\nlabel prevalence over 300 synthetic studies")
        for name, s in share.items():
            print(f"  {name:<22}{s:6.1%}")
    assert 0.005 <= share["lv_thrombus"] <= 0.06
    assert 0.01 <= share["hcm"] <= 0.09 and 0.01 <= share["pericardial_effusion"] <= 0.08
    assert 0.2 <= share["lv_dilatation"] <= 0.5 and 0.08 <= share["reduced_lvef"] <= 0.3


@pytest.mark.slow
def test_noise_does_not_break_simpson(tmp_path):
    """With the study's own noise and bias the blood pool is still measurable."""
    params = find_params("normal")
    ph = build_phantom(params)
    app = study_appearance(params)
    noisy = dataclasses.replace(params)
    areas, ed_masks = [], None
    for f in (0, params.es_frame):
        images, centers = [], []
        for pl in sax_stack(ph, noisy):
            images.append(render_plane(ph, noisy, app, pl, [f])[0])
            centers.append(_lv_center(ph, pl.position, pl.row_dir, pl.col_dir, pl.spacing))
        masks = blood_pool_masks(images, centers, ed_masks)
        ed_masks = ed_masks or masks
        areas.append(sum(m.sum() for m in masks) * pl.spacing**2 * params.sax_spacing_mm / 1000)
    assert abs(100 * (1 - areas[1] / areas[0]) - ph.volumes.lvef) < 8
