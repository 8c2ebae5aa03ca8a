"""Generating a synthetic cohort: studies in parallel, then the three CSV tables.

Every study is a pure function of (seed, study index): its random streams are
np.random.default_rng([seed, index, stream]), so the output does not depend on
the number of workers or on the cohort size (a small cohort is a prefix of a
larger one with the same seed, apart from folder-name padding). A site profile
(synth/site.py) says which hospital the cohort comes from; the default, "internal",
is the cohort as it always was.
"""

from __future__ import annotations

import contextlib
import csv
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmr_search.synth.dicom_writer import (
    TRUTH_COLUMNS,
    phase_to_stored,
    study_identity,
    to_stored,
    write_series,
)
from cmr_search.synth.labels import BINARY_LABELS, LABEL_COLUMNS, study_labels
from cmr_search.synth.params import sample_patient, sample_study_params
from cmr_search.synth.phantom import build_phantom
from cmr_search.synth.protocol import SeriesPlan, plan_protocol
from cmr_search.synth.render import LGE, flow_phase, render_plane, study_appearance
from cmr_search.synth.site import INTERNAL, SiteProfile, site_profile
from cmr_search.synth.tissues import contour_overlay

REPEAT_VISIT_RATE = 0.10
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# independent random streams of a study
_PLAN, _PARAMS, _PATIENT, _REPORT, _PROTOCOL = range(5)


@dataclass(frozen=True)
class StudyResult:
    """What one study contributes to the cohort tables."""

    index: int
    study_uid: str
    labels: dict
    report: str
    omitted: tuple[str, ...]
    truth: list[dict]
    n_files: int


@dataclass(frozen=True)
class CohortSummary:
    """Outcome of generate_cohort."""

    out_dir: Path
    n_studies: int
    n_series: int
    n_files: int
    seconds: float
    study_uids: tuple[str, ...]
    prevalence: dict[str, float]  # binary label -> share of studies
    omitted_findings: dict[str, tuple[str, ...]] = field(default_factory=dict)
    site: str = "internal"  # name of the site profile the cohort was generated with

    def prevalence_table(self) -> str:
        """Label prevalences as an aligned text table."""
        lines = [f"{'label':<22}{'n':>6}{'share':>9}"]
        for name, share in self.prevalence.items():
            lines.append(f"{name:<22}{round(share * self.n_studies):>6}{share:>9.1%}")
        return "\n".join(lines)


def plan_visits(seed: int, n_studies: int) -> list[tuple[int, int]]:
    """(patient_number, visit_index) per study; ~10% are repeat visits of earlier patients."""
    patient_of, visits, out = [], {}, []
    for i in range(n_studies):
        rng = np.random.default_rng([seed, i, _PLAN])
        if i > 0 and rng.random() < REPEAT_VISIT_RATE:
            patient = patient_of[int(rng.integers(i))]
        else:
            patient = i
        visit = visits.get(patient, 0)
        visits[patient] = visit + 1
        patient_of.append(patient)
        out.append((patient, visit))
    return out


def render_series(plan: SeriesPlan, ph, params, app, gain: float, slope: float) -> np.ndarray:
    """Stored uint16 pixels (n_planes, n_frames, rows, cols) of one planned series."""
    frames = np.asarray(plan.frames)
    out = []
    for p, plane in enumerate(plan.planes):
        stream = plan.noise_stream + p
        if plan.contrast == "lge":
            sig = render_plane(ph, params, app, plane, frames, contrast=LGE, noise_stream=stream)
        else:
            sig = render_plane(ph, params, app, plane, frames, noise_stream=stream)
        if plan.contrast == "flow_phase":
            out.append(phase_to_stored(flow_phase(ph, params, app, plane, frames, sig, stream)))
            continue
        if plan.contrast == "derived":
            sig = np.where(contour_overlay(ph, plane, frames), np.float32(1.8), sig)
        out.append(to_stored(sig, gain, slope))
    return np.stack(out)


def generate_study(seed: int, index: int, patient_number: int, visit: int, dicom_dir: Path,
                   folder: str, site: SiteProfile = INTERNAL) -> StudyResult:
    """Sample, build, render and write one study of `site`; returns its table rows."""
    patient = sample_patient(np.random.default_rng([seed, patient_number, _PATIENT]),
                             patient_number, site.archetypes)
    params = sample_study_params(np.random.default_rng([seed, index, _PARAMS]),
                                 study_index=index, patient=patient, visit_index=visit,
                                 site=site)
    ph = build_phantom(params)
    labels = study_labels(params, ph.volumes)
    report = site.write_report(labels, params, np.random.default_rng([seed, index, _REPORT]))
    first_day = (patient_number * 7919 + seed * 31) % 3000
    day = first_day + round((params.age - patient.age_first_visit) * 365.25)
    proto = plan_protocol(params, ph, np.random.default_rng([seed, index, _PROTOCOL]), day,
                          field_strength_t=site.field_strength_t)
    ident = study_identity(params, seed, proto.study_date, institution=site.institution,
                           namespace=site.namespace)
    app = study_appearance(params)
    truth, n_files = [], 0
    for plan in proto.series:
        stored = render_series(plan, ph, params, app, params.signal_gain, proto.rescale_slope)
        truth.append(write_series(dicom_dir / folder / plan.folder, ident, proto, plan, params,
                                  stored))
        n_files += 1 if plan.enhanced else stored.shape[0] * stored.shape[1]
    return StudyResult(index, ident.study_uid, labels, report.text, report.omitted, truth,
                       n_files)


def _write_tables(out_dir: Path, results: list[StudyResult]) -> None:
    with open(out_dir / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_uid", "report"])
        w.writerows([r.study_uid, r.report] for r in results)
    with open(out_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_uid", *LABEL_COLUMNS])
        w.writerows([r.study_uid, *(r.labels[c] for c in LABEL_COLUMNS)] for r in results)
    with open(out_dir / "truth.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TRUTH_COLUMNS)
        w.writeheader()
        for r in results:
            w.writerows(r.truth)


def _clear_outputs(out_dir: Path, overwrite: bool) -> None:
    dicom = out_dir / "dicom"
    if dicom.exists() and any(dicom.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dicom} is not empty; choose a new output folder or pass "
                                  "overwrite=True to replace the earlier cohort")
        shutil.rmtree(dicom)
    for name in ("reports.csv", "labels.csv", "truth.csv"):
        (out_dir / name).unlink(missing_ok=True)


def generate_cohort(
    n_studies: int,
    out_dir: Path,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
    site: str | SiteProfile = "internal",
) -> CohortSummary:
    """Write n_studies synthetic cine CMR studies as DICOM plus reports, labels and truth.

    Layout: out_dir/dicom/study_NNNN/<series folder>/IM_NNNN.dcm, reports.csv,
    labels.csv and truth.csv. Deterministic for a seed, whatever `workers` is
    (default: all CPUs). A progress bar goes to stderr when `progress` is set.
    `site`: a profile name of site.SITES ("internal", "external") or a SiteProfile;
    another site's cohort has its own UIDs and patients, whatever the seed.
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be at least 1, got {n_studies}")
    profile = site_profile(site)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir, overwrite)
    dicom_dir = out_dir / "dicom"
    width = max(4, len(str(n_studies - 1)))
    visits = plan_visits(seed, n_studies)
    jobs = [(seed, i, p, v, dicom_dir, f"study_{i:0{width}d}", profile)
            for i, (p, v) in enumerate(visits)]
    workers = max(1, min(workers or multiprocessing.cpu_count(), n_studies))
    start = time.perf_counter()
    results = _run(jobs, workers, progress)
    results.sort(key=lambda r: r.index)
    _write_tables(out_dir, results)
    prevalence = {name: float(np.mean([r.labels[name] for r in results]))
                  for name in BINARY_LABELS}
    summary = CohortSummary(
        out_dir=out_dir, n_studies=n_studies, n_series=sum(len(r.truth) for r in results),
        n_files=sum(r.n_files for r in results), seconds=time.perf_counter() - start,
        study_uids=tuple(r.study_uid for r in results), prevalence=prevalence,
        omitted_findings={r.study_uid: r.omitted for r in results if r.omitted},
        site=profile.name,
    )
    if progress:
        print(summary.prevalence_table(), file=sys.stderr)
    return summary


def _single_blas_thread():
    """Limit BLAS to one thread in this process, where threadpoolctl is installed.

    The generator's matrix products are tiny; waking BLAS threads for each costs
    more than the product itself.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up only
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _run(jobs: list[tuple], workers: int, progress: bool) -> list[StudyResult]:
    from cmr_search.core.progress import progress_bar

    bar = progress_bar(progress)
    results = []
    with bar:
        task = bar.add_task("synthetic studies", total=len(jobs))
        if workers == 1:
            with _single_blas_thread():
                for job in jobs:
                    results.append(generate_study(*job))
                    bar.advance(task)
            return results
        # spawn: the caller may hold threads (torch, BLAS) that fork would copy mid-flight;
        # one BLAS thread per worker, as the workers already fill the cores
        ctx = multiprocessing.get_context("spawn")
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(generate_study, *job) for job in jobs]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.advance(task)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return results
