"""Bad input never stops a run and is never silent; a study is stored whole or not at all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from store_data import real_dicom_dirs

from cmr_search.ingest import IngestConfig, ingest
from cmr_search.store import ClipStore


def _study_dirs(cohort: Path) -> list[Path]:
    return sorted(p for p in (cohort / "dicom").iterdir() if p.is_dir())


def _classic_cine_series(study: Path) -> Path:
    """A folder holding a classic (one file per frame) 4CH cine of this study; the last
    one, since an earlier acquisition of the same view is superseded and never decoded."""
    for series in sorted(study.iterdir(), reverse=True):
        files = sorted(series.glob("*.dcm"))
        if len(files) >= 20:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            if "4C" in str(ds.SeriesDescription).upper().replace(" ", "") or "4CH" in series.name.upper():
                return series
    pytest.skip("no classic 4CH series in this study")


@pytest.fixture()
def damaged(cohort, tmp_path) -> dict:
    """Three studies copied, two of them damaged, plus loose bad files."""
    studies = [s for s in _study_dirs(cohort) if any(len(list(x.glob('*.dcm'))) >= 20 for x in s.iterdir())][:4]
    root = tmp_path / "in"
    for s in studies:
        shutil.copytree(s, root / s.name)
    good, truncated, ragged, nopixels = (root / s.name for s in studies)
    # 1. truncate one frame of a cine: its study must not be written at all
    victim = sorted(_classic_cine_series(truncated).glob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:-4000])
    # 2. ragged frame sizes inside a cine series of another study
    series = _classic_cine_series(ragged)
    f = sorted(series.glob("*.dcm"))[3]
    ds = pydicom.dcmread(f)
    arr = ds.pixel_array[:-8, :]
    ds.Rows = arr.shape[0]
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(f)
    bad = root / "loose"
    bad.mkdir()
    (bad / "notes.dcm").write_text("this is not DICOM\n")
    # 3. missing pixel data in one frame of a cine
    f = sorted(_classic_cine_series(nopixels).glob("*.dcm"))[2]
    ds = pydicom.dcmread(f)
    del ds.PixelData
    ds.save_as(f)
    # 4. a cine with a single frame
    ds = pydicom.dcmread(min(_classic_cine_series(good).glob("*.dcm")))
    ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["loose-study"])  # not the good study's
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["one-frame"])
    ds.SeriesDescription = "cine_2ch_single"
    ds.save_as(bad / "one_frame.dcm")
    # 5. absurd dimensions
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["absurd"])
    ds.Rows = 60000
    ds.save_as(bad / "absurd.dcm")
    # 6. an empty file
    (bad / "empty.dcm").write_bytes(b"")
    return {"root": root, "good": good, "truncated": truncated, "ragged": ragged, "nopixels": nopixels}


def _uid(study: Path) -> str:
    return pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID


def test_bad_inputs_are_reported_and_never_half_written(damaged, tmp_path, salt):
    store = ClipStore.open(tmp_path / "store", create=True)
    report = ingest([damaged["root"]], store, IngestConfig(workers=2), salt, progress=False)
    assert report.exit_code == 3
    reasons = [r["reason"] for r in report.rejected]
    text = "\n".join(reasons)
    assert "not a DICOM file" in text
    assert "missing pixel data" in text
    assert "single frame" in text
    assert "absurd dimensions" in text
    assert "ragged frame sizes" in text
    assert "truncated pixel data" in text
    assert "not written" in text
    written = store.study_uids()
    assert _uid(damaged["good"]) in written
    assert _uid(damaged["truncated"]) not in written  # nothing of a half-read study
    assert _uid(damaged["nopixels"]) not in written
    # each rejection names where it happened
    assert all(r["where"] for r in report.rejected)


def test_allow_partial_keeps_the_good_series(damaged, tmp_path, salt):
    store = ClipStore.open(tmp_path / "store", create=True)
    ingest([damaged["truncated"]], store, IngestConfig(allow_partial=True), salt, progress=False)
    assert _uid(damaged["truncated"]) in store.study_uids()


def test_zip_input_gives_the_same_clips(cohort, tmp_path, salt):
    study = _study_dirs(cohort)[0]
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(study.rglob("*.dcm")):
            zf.write(f, f.relative_to(study.parent))
    a = ClipStore.open(tmp_path / "a", create=True)
    b = ClipStore.open(tmp_path / "b", create=True)
    ingest([study], a, IngestConfig(), salt, progress=False)
    ingest([archive], b, IngestConfig(), salt, progress=False)
    ids_a = sorted(a.clip_metadata(["clip_id"])["clip_id"].to_pylist())
    ids_b = sorted(b.clip_metadata(["clip_id"])["clip_id"].to_pylist())
    assert ids_a and ids_a == ids_b
    assert np.array_equal(a.get_clip(ids_a[0])[1], b.get_clip(ids_a[0])[1])


def test_real_files_from_pydicom_data_are_read_or_rejected_with_reasons(tmp_path, salt):
    dirs = real_dicom_dirs()
    assert len(dirs) == 2, "pydicom-data (a dev dependency) is not installed"
    store = ClipStore.open(tmp_path / "store", create=True)
    report = ingest(dirs, store, IngestConfig(workers=2), salt, progress=False)
    file_level = [r for r in report.skipped + report.rejected if not r["series_uid"]]
    # every file is accounted for: read, or rejected/skipped with a reason
    assert report.files_read + len([r for r in file_level if not r["study_uid"]]) + len(
        [r for r in report.skipped + report.rejected if r["study_uid"] and not r["where"].startswith(("series", "study"))]
    ) >= report.files_found
    assert all(r["reason"] for r in report.rejected + report.skipped)
    assert any("modality CT is not MR" in r["reason"] for r in report.skipped)
    assert any("not a DICOM file" in r["reason"] for r in report.rejected)


def test_cli_exit_codes_and_json(cohort, tmp_path):
    study = _study_dirs(cohort)[0]
    cmd = [sys.executable, "-m", "cmr_search.cli"]
    ok = subprocess.run([*cmd, "ingest", str(study), "--store", str(tmp_path / "s"), "--json", "--workers", "1"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["exit_code"] == 0 and doc["clips_inserted"] > 0
    missing = subprocess.run([*cmd, "ingest", str(tmp_path / "nope"), "--store", str(tmp_path / "s")], capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    # a failed ingest into a new store leaves no store behind
    fresh = subprocess.run([*cmd, "ingest", str(tmp_path / "nope"), "--store", str(tmp_path / "new" / "s")],
                           capture_output=True, text=True, check=False)
    assert fresh.returncode == 2 and not (tmp_path / "new").exists()
    # the first label import creates the label table without Lance's warning and its machine path
    labelled = subprocess.run([*cmd, "ingest", str(study), "--store", str(tmp_path / "l"), "--workers", "1",
                               "--labels", str(cohort / "labels.csv")], capture_output=True, text=True, check=False)
    assert labelled.returncode == 0 and "WARN" not in labelled.stderr and str(tmp_path) not in labelled.stderr
    # and says which of its columns are labels and which are kept as text only
    said = " ".join(labelled.stderr.split())
    assert "numeric columns kept as labels" in said and "lvef" in said and "sex kept as text" in said
    mismatch = subprocess.run([*cmd, "ingest", str(study), "--store", str(tmp_path / "s"), "--size", "224"], capture_output=True, text=True, check=False)
    assert mismatch.returncode == 2 and "use a new store" in mismatch.stderr.replace("\n", " ")
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("id,lvef\n1,50\n")
    r = subprocess.run([*cmd, "ingest", str(study), "--store", str(tmp_path / "s"), "--labels", str(bad_labels)], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "no 'study_uid' column" in r.stderr.replace("\n", " ")


def test_series_split_across_units_are_read_again_with_the_same_result(cohort, tmp_path, salt):
    study = _study_dirs(cohort)[0]
    whole = ClipStore.open(tmp_path / "whole", create=True)
    split = ClipStore.open(tmp_path / "split", create=True)
    ingest([study], whole, IngestConfig(), salt, progress=False)
    # 7 files per unit: nearly every series spans several units, so the study pass decodes them
    ingest([study], split, IngestConfig(max_files_per_unit=7, workers=2), salt, progress=False)
    ids = sorted(whole.clip_metadata(["clip_id"])["clip_id"].to_pylist())
    assert ids == sorted(split.clip_metadata(["clip_id"])["clip_id"].to_pylist())
    for clip_id in ids:
        assert np.array_equal(whole.get_clip(clip_id)[1], split.get_clip(clip_id)[1])


def test_a_zero_sized_image_is_rejected_and_a_linked_folder_reported(cohort, tmp_path, salt):
    study = _study_dirs(cohort)[0]
    root = tmp_path / "in"
    shutil.copytree(study, root / study.name)
    ds = pydicom.dcmread(min((root / study.name).rglob("*.dcm")))
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["zero-size"])
    ds.Rows = ds.Columns = 0
    (root / "loose").mkdir()
    ds.save_as(root / "loose" / "zero.dcm")
    (root / "loop").symlink_to(root, target_is_directory=True)  # would walk forever if followed
    (root / "elsewhere").symlink_to(study, target_is_directory=True)
    report = ingest([root], ClipStore.open(tmp_path / "store", create=True), IngestConfig(), salt, progress=False)
    assert report.exit_code == 3
    assert any("0x0 pixels" in r["reason"] for r in report.rejected)
    links = sorted(Path(r["where"]).name for r in report.skipped if "symbolic link" in r["reason"])
    assert links == ["elsewhere", "loop"]
    assert report.studies_written == 1
