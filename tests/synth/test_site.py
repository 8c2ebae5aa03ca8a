"""Site profiles of the synthetic generator (synth/site.py): the external site shifts what
its profile says (scanners, 3 T, acquisition, report wording, case mix), its reports stay
readable by the findings parser, its cohort ingests, and the internal site is the default
cohort unchanged."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cmr_search.findings.parse import FindingParser, ef_grade, summarise
from cmr_search.ingest import IngestConfig
from cmr_search.ingest.pipeline import ingest_into
from cmr_search.store import ClipStore
from cmr_search.synth import (
    FINDINGS,
    build_phantom,
    generate_cohort,
    sample_study_params,
    study_labels,
)
from cmr_search.synth.dicom_writer import uid
from cmr_search.synth.protocol import SCANNERS
from cmr_search.synth.render import study_appearance
from cmr_search.synth.site import EXTERNAL, INTERNAL, SITES, SiteProfile, site_profile

CMR = [sys.executable, "-m", "cmr_search.cli"]
EXTERNAL_SEED = 25  # its 2 external studies: a Canon and a Philips scanner
# content_digest of generate_cohort(2, seed=0) as written by the generator before site
# profiles existed (commit 01c9466). Not a hash of the raw bytes: the float64 geometry of
# the headers differs in its last digit between CPUs (SIMD and BLAS kernels), so DS values
# are compared to 1e-4 mm; pixels, UIDs, texts and tables are compared exactly.
INTERNAL_SEED0_DIGEST = "28f02d46cdaed1ce51617791b4c649eba5f71d1d0741bc19e1edb3b06db180d3"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _value(el) -> str:
    if el.VR in ("DS", "FD", "FL"):
        values = el.value if isinstance(el.value, (list, tuple, pydicom.multival.MultiValue)) else [el.value]
        # + 0.0 turns -0.0 into 0.0: a cross product gives either for an exact zero
        return repr([round(float(v), 4) + 0.0 for v in values if v is not None and v != ""])
    return repr(el.value)


def content_digest(root: Path) -> str:
    """SHA-256 over the tables, the file names and every DICOM element (pixel data raw)."""
    h = hashlib.sha256()
    for name in ("labels.csv", "reports.csv", "truth.csv"):
        h.update((root / name).read_bytes())
    for path in sorted((root / "dicom").rglob("*.dcm")):
        h.update(path.relative_to(root).as_posix().encode())
        ds = pydicom.dcmread(path)
        for el in [*ds.file_meta, *ds.iterall()]:
            if el.VR == "SQ":  # its items' elements come next in iterall
                continue
            h.update(f"{el.tag}{el.VR}".encode())
            h.update(el.value if el.tag == 0x7FE00010 else _value(el).encode())
    return h.hexdigest()


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]


def _reports(site: SiteProfile, n: int, seed: int) -> list:
    out = []
    for k in range(n):
        params = sample_study_params(np.random.default_rng([seed, k]), study_index=k, site=site)
        labels = study_labels(params, build_phantom(params).volumes)
        out.append((labels, site.write_report(labels, params, np.random.default_rng([seed, k, 9]))))
    return out


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """`cmr synth --site external --studies 2` end to end: (folder, JSON summary)."""
    out = tmp_path_factory.mktemp("external") / "cohort"
    run = subprocess.run([*CMR, "synth", "--site", "external", "--studies", "2", "--seed",
                          str(EXTERNAL_SEED), "--workers", "2", "--out", str(out), "--json"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    return out, json.loads(run.stdout)


@pytest.fixture(scope="module")
def parser() -> FindingParser:
    return FindingParser()


# ---------------------------------------------------------------- profiles


def test_profiles_by_name_and_their_checks(tmp_path):
    assert site_profile("external") is EXTERNAL and site_profile(INTERNAL) is INTERNAL
    assert set(SITES) == {"internal", "external"}
    assert INTERNAL.namespace == "" and EXTERNAL.namespace == "external"
    with pytest.raises(ValueError, match="unknown site"):
        site_profile("elsewhere")
    with pytest.raises(ValueError, match="unknown site"):
        generate_cohort(1, tmp_path / "x", site="elsewhere", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(dataclasses.FrozenInstanceError):
        EXTERNAL.name = "other"  # type: ignore[misc]
    for bad in ({"vendor_mix": (("hitachi", 1.0),)}, {"frames": (30, 20)},
                {"report_style": "telegram"}, {"name": "Other Site"},
                {"archetypes": (("normal", 0.0),)}):
        with pytest.raises(ValueError):
            dataclasses.replace(EXTERNAL, **bad)
    custom = dataclasses.replace(EXTERNAL, name="mini", frames=(30, 30))
    assert sample_study_params(np.random.default_rng(1), site=custom).n_frames == 30


def test_external_draws_follow_the_profile():
    """Cheap parameter draws: the vendor mix, acquisition ranges and case mix of each site."""
    draws = {s.name: [sample_study_params(np.random.default_rng([8, k]), study_index=k, site=s)
                      for k in range(1500)] for s in (INTERNAL, EXTERNAL)}
    ext, internal = draws["external"], draws["internal"]
    styles = Counter(p.vendor_style for p in ext)
    assert set(styles) == {"philips", "ge", "canon", "siemens"}
    for style, weight in EXTERNAL.vendor_mix:
        assert abs(styles[style] / len(ext) - weight) < 0.05, styles
    assert {p.vendor_style for p in internal} == {"siemens", "ge", "philips", "ukbiobank", "kaggle"}
    assert all(p.n_frames == 25 for p in ext)
    assert len({p.n_frames for p in internal}) > 10
    lo, hi = EXTERNAL.pixel_spacing_mm
    assert all(lo <= p.pixel_spacing_mm <= hi for p in ext)
    assert all(EXTERNAL.noise_sigma[0] <= p.noise_sigma <= EXTERNAL.noise_sigma[1] for p in ext)
    assert np.mean([p.noise_sigma for p in ext]) < 0.6 * np.mean([p.noise_sigma for p in internal])
    assert np.mean([p.bias_strength for p in ext]) > np.mean([p.bias_strength for p in internal])
    assert {p.slice_thickness_mm for p in ext} == {6.0} and {p.slice_thickness_mm for p in internal} == {8.0}
    dcm = {name: np.mean([p.archetype == "dcm" for p in d]) for name, d in draws.items()}
    assert dcm["external"] > 1.4 * dcm["internal"]
    # the internal profile is what sample_study_params draws without one
    assert internal[:50] == [sample_study_params(np.random.default_rng([8, k]), study_index=k)
                             for k in range(50)]
    # the site's myocardium contrast scales the study's contrast jitter
    p = ext[0]
    plain = study_appearance(dataclasses.replace(p, myocardium_contrast=1.0)).myocardium_scale
    assert study_appearance(p).myocardium_scale == pytest.approx(0.85 * plain)


# ---------------------------------------------------------------- the external cohort


def test_external_cohort_headers_say_the_profile(external):
    out, summary = external
    assert summary["site"] == "external" and summary["n_studies"] == 2
    truth = read_csv(out / "truth.csv")
    assert {r["style"] for r in truth} == {"canon", "philips"}
    by_series = {r["series_uid"]: r for r in truth}
    manufacturers = {SCANNERS[s][0] for s, _ in EXTERNAL.vendor_mix}
    lo, hi = EXTERNAL.pixel_spacing_mm
    files = sorted((out / "dicom").rglob("*.dcm"))
    assert files
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        row = by_series[ds.SeriesInstanceUID]
        assert float(ds.MagneticFieldStrength) == 3.0
        assert "external" in ds.InstitutionName
        assert ds.Manufacturer == SCANNERS[row["style"]][0] and ds.Manufacturer in manufacturers
        assert ds.PatientID.startswith("ZZSYNTH-PID-external-")
        if row["kind"] != "cine":
            continue
        pixel = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0] if "NumberOfFrames" in ds else ds
        assert lo <= float(pixel.PixelSpacing[0]) <= hi
        assert float(pixel.SliceThickness) == EXTERNAL.slice_thickness_mm
        assert int(ds.CardiacNumberOfImages) == 25 and row["n_frames"] == "25"
    canon = [r["series_description"] for r in truth if r["style"] == "canon" and r["kind"] == "cine"]
    assert "CINE SSFP 4CH" in canon
    # another site's cohort never shares a study with the default cohort of the same seed
    internal_uids = {uid(EXTERNAL_SEED, "study", i) for i in range(2)}
    assert not internal_uids & set(summary["study_uids"])


def test_external_cohort_ingests_with_every_view_recognised(external, tmp_path):
    out, summary = external
    report = ingest_into([out / "dicom"], tmp_path / "store", IngestConfig(workers=2), "test-salt",
                         reports=out / "reports.csv", labels=out / "labels.csv", progress=False)
    assert report.exit_code == 0, report.rejected
    store = ClipStore.open(tmp_path / "store")
    assert set(store.study_uids()) == set(summary["study_uids"])
    truth = read_csv(out / "truth.csv")
    view_of = {r["series_uid"]: r["view"] for r in truth if r["kind"] == "cine"}
    clips = store.clip_metadata().to_pylist()
    assert {c["series_uid"] for c in clips} == {
        r["series_uid"] for r in truth if r["kind"] == "cine" and r["superseded"] == "0"}
    wrong = [(c["series_description"], c["view"]) for c in clips if c["view"] != view_of[c["series_uid"]]]
    assert not wrong
    assert {c["vendor"] for c in clips} == {"CANON_MEC", "Philips Medical Systems"}


# ---------------------------------------------------------------- reports


def test_external_reports_are_read_by_the_findings_parser(parser):
    """Every finding an external report states is found with its polarity and grade."""
    cohort = _reports(EXTERNAL, 150, seed=3)
    parsed = parser.parse_many([r.text for _, r in cohort])
    stated = wrong = extra = checked = right = omitted = 0
    for (labels, report), mentions in zip(cohort, parsed):
        said = summarise(mentions)
        for finding, present in report.mentions:
            assert bool(labels[finding]) == present, (finding, report.text)
            stated += 1
            wrong += finding not in said or said[finding].present != present
        stated_present = {f for f, present in report.mentions if present}
        for finding in FINDINGS:  # what is present is said, unless the report leaves it out
            if labels[finding] and finding not in report.omitted:
                assert finding in stated_present, (finding, report.text)
        omitted += bool(report.omitted)
        for finding, st in said.items():
            mild_lvef = finding == "reduced_lvef" and st.present and st.grade == 1
            if st.evidence == ("Structurally normal heart",):  # denies every finding
                assert not st.present and not labels[finding], report.text
            elif finding not in dict(report.mentions) and finding not in report.omitted and not mild_lvef:
                extra += 1
        truth = {"lv_dilatation": int(labels["lv_dilatation_grade"]), "reduced_lvef": ef_grade(labels["lvef"]),
                 "pericardial_effusion": 1 if labels["effusion_mm"] < 10 else 2 if labels["effusion_mm"] < 20 else 3}
        for finding, grade in truth.items():
            st = said.get(finding)
            if st is not None and st.present and st.grade is not None:
                checked += 1
                right += st.grade == grade
    assert stated > 800
    assert wrong / stated <= 0.01, wrong
    assert extra / stated <= 0.02, extra
    assert checked > 40 and right == checked
    assert 0 < omitted < 40


def test_external_reports_use_their_own_wording():
    internal = [r.text for _, r in _reports(INTERNAL, 20, seed=4)]
    external = [r.text for _, r in _reports(EXTERNAL, 20, seed=4)]
    shared = {s for t in internal for s in _sentences(t)} & {s for t in external for s in _sentences(t)}
    assert not shared
    assert all("FINDINGS:" in t and "IMPRESSION:" in t for t in external)
    assert not any("Normal study" in t or "Impression:" in t for t in external)
    assert any("EF estimated at" in t for t in external)
    assert not any("FINDINGS:" in t or "EF estimated at" in t for t in internal)


# ---------------------------------------------------------------- the internal site


def test_internal_cohort_is_the_default_cohort_unchanged(tmp_path):
    summary = generate_cohort(2, tmp_path / "internal", seed=0, workers=2, progress=False)
    assert summary.site == "internal"
    assert content_digest(tmp_path / "internal") == INTERNAL_SEED0_DIGEST
    first = next((tmp_path / "internal" / "dicom").rglob("*.dcm"))
    assert pydicom.dcmread(first, stop_before_pixels=True).InstitutionName == "ZZSYNTH Heart Institute"
