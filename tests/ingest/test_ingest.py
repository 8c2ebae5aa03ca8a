"""Ingestion of the synthetic cohort: views, slices, frame order, repeats, idempotence, PHI."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cmr_search.ingest import IngestConfig, ingest
from cmr_search.ingest.clips import make_clip
from cmr_search.store import ClipStore


def _clips(store: ClipStore) -> list[dict]:
    return store.clip_metadata().to_pylist()


def test_every_cine_and_only_cines_become_clips(ingested, truth):
    store, report = ingested
    assert report.exit_code == 0, report.rejected
    clips = _clips(store)
    by_series = defaultdict(list)
    for c in clips:
        by_series[c["series_uid"]].append(c)
    for row in truth:
        got = by_series.get(row["series_uid"], [])
        if row["kind"] != "cine" or row["superseded"] == "1":
            assert not got, f"{row['series_description']} ({row['kind']}) must be skipped"
        else:
            assert len(got) == int(row["n_slices"]), row["series_description"]
    reasons = " ".join(s["reason"] for s in report.skipped)
    for kind in ("localizer", "phase-contrast flow", "late gadolinium enhancement", "derived series", "superseded"):
        assert kind in reasons


def test_view_classification_matches_truth(ingested, truth):
    store, _ = ingested
    view_of = {r["series_uid"]: r["view"] for r in truth if r["kind"] == "cine"}
    clips = _clips(store)
    correct = sum(c["view"] == view_of[c["series_uid"]] for c in clips)
    assert correct == len(clips), [(c["series_description"], c["view"]) for c in clips if c["view"] != view_of[c["series_uid"]]]
    assert {c["view_source"] for c in clips} <= {"description", "folder"}


def test_sax_slices_are_split_and_ordered_base_to_apex(ingested, truth):
    store, _ = ingested
    clips = [c for c in _clips(store) if c["view"] == "SAX"]
    per_study = defaultdict(list)
    for c in clips:
        per_study[c["study_uid"]].append(c)
    expected = defaultdict(int)
    for r in truth:
        if r["kind"] == "cine" and r["view"] == "SAX" and r["superseded"] != "1":
            expected[r["study_uid"]] += int(r["n_slices"])
    truth_index = {r["series_uid"]: int(r["slice_index"]) for r in truth if r["view"] == "SAX" and r["slice_index"] not in ("", "-1")}
    for study, members in per_study.items():
        assert len(members) == expected[study]
        indices = sorted(c["slice_index"] for c in members)
        assert indices == list(range(len(members)))
        assert all(c["n_slices"] == len(members) for c in members)
        for c in members:  # one series per slice: the generator knows the anatomical index
            if c["series_uid"] in truth_index:
                assert c["slice_index"] == truth_index[c["series_uid"]]
    multi = [r for r in truth if r["view"] == "SAX" and r["slice_index"] == "-1" and r["kind"] == "cine"]
    assert multi, "the cohort should hold a SAX stack in a single series"


def _series_files(cohort: Path, series_uid: str) -> list[pydicom.Dataset]:
    out = []
    for path in sorted((cohort / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SeriesInstanceUID == series_uid:
            out.append(pydicom.dcmread(path))
    return out


def test_frames_follow_trigger_time_not_instance_number(ingested, truth, cohort):
    store, _ = ingested
    clips = _clips(store)
    # a classic single-slice long-axis cine with TriggerTime
    classic = {r["series_uid"] for r in truth if r["enhanced"] == "0"}
    candidates = [c for c in clips if c["view"] == "4CH" and c["time_source"] == "trigger_time" and c["series_uid"] in classic]
    assert candidates
    meta, stored = store.get_clip(candidates[0]["clip_id"])
    files = _series_files(cohort, meta["series_uid"])
    if len(files) == 1:  # enhanced multi-frame: frames already in the object
        pytest.skip("enhanced object")
    by_time = sorted(files, key=lambda d: float(d.TriggerTime))
    stack = np.stack([d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0)) for d in by_time])
    expected = make_clip(stack, tuple(float(v) for v in by_time[0].PixelSpacing), store.clip_config)
    assert np.array_equal(stored, expected)
    # and the clip frames are acquired frames spread over the cycle, not the first 16
    assert not np.array_equal(stored, make_clip(stack[: len(stored)], tuple(float(v) for v in by_time[0].PixelSpacing), store.clip_config))
    # the heart beats: frames differ, and the cycle closes (last frame near the first)
    diffs = np.abs(np.diff(stored.astype(float), axis=0)).mean(axis=(1, 2))
    assert diffs.max() > 1.0
    assert np.abs(stored[0].astype(float) - stored[-1].astype(float)).mean() < np.abs(stored[0].astype(float) - stored[len(stored) // 2].astype(float)).mean()


def test_clip_shape_and_metadata(ingested):
    store, report = ingested
    meta, clip = store.get_clip(_clips(store)[0]["clip_id"])
    cfg = store.clip_config
    assert clip.shape == (cfg.frames, cfg.size, cfg.size) and clip.dtype == np.uint8
    assert clip.min() == 0 and clip.max() == 255
    assert meta["source_frames"] >= 20
    assert meta["sex"] in ("M", "F") and meta["age"] > 0
    assert report.reports_imported == report.labels_imported == report.studies_written


def test_reingest_of_the_same_files_writes_nothing(ingested, cohort, salt, tmp_path):
    from store_data import copy_store

    store = ClipStore.open(copy_store(ingested[0].root, tmp_path / "store"))
    before, version = store.count_clips(), store.clips.version
    stamps = store.clip_metadata(["clip_id", "ingested_at"]).to_pylist()
    again = ingest([cohort / "dicom"], store, IngestConfig(workers=1), salt, progress=False)
    assert (again.clips_inserted, again.clips_updated, again.clips_unchanged) == (0, 0, before)
    assert store.count_clips() == before and store.clips.version == version  # not even a commit
    assert store.clip_metadata(["clip_id", "ingested_at"]).to_pylist() == stamps  # embeddings stay current
    # what did change is written: here the site label of every clip
    moved = ingest([cohort / "dicom"], store, IngestConfig(workers=1, site="B"), salt, progress=False)
    assert (moved.clips_inserted, moved.clips_updated, moved.clips_unchanged) == (0, before, 0)
    assert set(store.clip_metadata(["site"])["site"].to_pylist()) == {"B"}
    # the rewrite left replaced rows behind: compacted away at once
    assert store.clips.stats()["fragment_stats"]["num_fragments"] == 1


def test_appends_are_not_compacted_until_fragments_pile_up(cohort, tmp_path, salt):
    store = ClipStore.open(tmp_path / "store", create=True)
    report = ingest([cohort / "dicom"], store, IngestConfig(workers=1, studies_per_commit=3), salt, progress=False)
    commits = -(-report.studies_written // 3)
    fragments = store.clips.stats()["fragment_stats"]["num_fragments"]
    assert commits > 1 and fragments == commits  # one fragment per commit, none rewritten
    data = store.root / "lance" / "clips.lance" / "data"
    _assert_stored_as_they_are(store, data.glob("*.lance"))
    assert not store.optimize(compact_fragments=commits)
    assert store.optimize(compact_fragments=commits - 1)
    assert store.clips.stats()["fragment_stats"]["num_fragments"] == 1
    assert store.count_clips() == report.clips_inserted
    # compaction keeps the table's file format (the older files stay a day for readers)
    _assert_stored_as_they_are(store, [max(data.glob("*.lance"), key=lambda f: f.stat().st_mtime_ns)])


def _assert_stored_as_they_are(store: ClipStore, files) -> None:
    """The clip pixels are on disk as they are: Lance's newer file formats compress each
    clip, ~14 % smaller for 15x the write time (indexer.clip_store.CLIP_STORAGE_VERSION)."""
    cfg = store.clip_config
    pixels = store.count_clips() * cfg.frames * cfg.size * cfg.size
    on_disk = sum(f.stat().st_size for f in files)
    assert pixels <= on_disk < 1.05 * pixels


def test_no_patient_identifiers_in_store(ingested, cohort):
    store, _ = ingested
    ds = pydicom.dcmread(next((cohort / "dicom").rglob("*.dcm")), stop_before_pixels=True)
    needles = [b"ZZSYNTH", str(ds.PatientID).encode(), str(ds.PatientName).encode()]
    assert b"ZZSYNTH" in str(ds.PatientName).encode()  # the generator wrote dummy PHI
    for path in store.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"{needle!r} found in {path}"
    keys = {c["patient_key"] for c in _clips(store)}
    assert all(len(k) == 20 and str(ds.PatientID) not in k for k in keys)


def test_repeat_visits_share_a_patient_key(ingested, cohort):
    store, _ = ingested
    patient_of = {}
    for study_dir in sorted((cohort / "dicom").iterdir()):
        f = next(study_dir.rglob("*.dcm"))
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        patient_of[ds.StudyInstanceUID] = str(ds.PatientID)
    key_of = {c["study_uid"]: c["patient_key"] for c in _clips(store)}
    for a, key_a in key_of.items():
        for b, key_b in key_of.items():
            assert (key_a == key_b) == (patient_of[a] == patient_of[b])


def test_every_clip_is_ordered_by_cardiac_timing(ingested, truth):
    store, _ = ingested
    enhanced = {r["series_uid"] for r in truth if r["enhanced"] == "1"}
    clips = _clips(store)
    assert any(c["series_uid"] in enhanced for c in clips), "the cohort should hold Enhanced MR cines"
    for c in clips:
        # Enhanced MR carries NominalCardiacTriggerDelayTime (FD) per frame; classic files
        # TriggerTime, or the Philips private phase number when it is missing
        assert c["time_source"] in ("trigger_time", "philips_phase"), (c["series_description"], c["time_source"])
        if c["series_uid"] in enhanced:
            assert c["time_source"] == "trigger_time"
        assert c["rr_ms"] is None or 300 < c["rr_ms"] < 2000
