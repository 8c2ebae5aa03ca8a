"""``cmr ingest``: DICOM files -> studies -> cine slices -> canonical clips in the store.

One read of every file: workers take a folder at a time, parse each file with its pixel
bytes, and cut the clips of the cine series complete in that folder (decoys are never
decoded). The main process then plans each study from all headers (views, SAX order,
repeats) and writes it; series spread over several folders are read again at that stage.
Each batch of whole studies is one Lance commit, so an interrupted run leaves every
study either fully written or absent.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from cmr_search.core.progress import progress_bar
from cmr_search.ingest.config import IngestConfig
from cmr_search.ingest.discover import discover, require_paths
from cmr_search.ingest.headers import FileHeader, Rejection
from cmr_search.ingest.report import IngestReport, save_report
from cmr_search.ingest.series import StudyPlan, group_by_study, plan_study
from cmr_search.ingest.units import build_study, frames_key, scan_unit, units_of
from cmr_search.ingest.workers import pool_map, share_work, worker_pool
from cmr_search.store.patients import patient_salt
from cmr_search.store.tombstones import Tombstones

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from pydantic import SecretStr
    from rich.progress import Progress

    from cmr_search.store.clip_store import ClipStore
    from cmr_search.store.sources import Origin

__all__ = ["add_phase", "check_tables", "commit_studies", "finish_ingest", "ingest", "ingest_files", "ingest_into",
           "plan_studies"]


def _batches(results: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in results:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest(paths: list[Path], store: ClipStore, cfg: IngestConfig, salt: bytes, reports: Path | None = None,
           labels: Path | None = None, progress: bool = True,
           before_commit: Callable[[str], None] | None = None, origin: Origin | None = None) -> IngestReport:
    """Ingest DICOM under ``paths`` (folders, zips, files) into ``store``; never raises on bad files.

    Each commit of whole studies holds the store's write lock and leaves out studies that
    were withdrawn (tombstones), however long ago their files were read; it records where
    the studies came from (``origin``; default: files, named by the site label).
    ``before_commit("clips")`` runs before each commit: the seam interleaving tests pause at."""
    t0 = time.perf_counter()
    report = IngestReport()
    check_tables(store, reports, labels)
    if cfg.ray is not None:  # the same steps as tasks of a Ray cluster, one commit at the end
        from cmr_search.ingest.cluster import ingest_on_ray

        require_paths(paths)
        ingest_on_ray(paths, store, cfg, salt, report, None if cfg.ray == "local" else cfg.ray, progress, origin)
    else:
        with progress_bar(progress) as bar, worker_pool(cfg.workers) as pool:
            ingest_files(paths, store, cfg, salt, report, bar, pool, before_commit, origin)
    finish_ingest(store, report, reports, labels, t0)
    return report


def check_tables(store: ClipStore, reports: Path | None, labels: Path | None) -> None:
    """Fail before any DICOM is read on a report or label file that cannot be imported."""
    for kind, path in (("reports", reports), ("labels", labels)):
        if path is not None:
            store.check_table_file(path, kind)


def ingest_files(paths: list[Path], store: ClipStore, cfg: IngestConfig, salt: bytes, report: IngestReport,
                 bar: Progress, pool: ProcessPoolExecutor | None, before_commit: Callable[[str], None] | None = None,
                 origin: Origin | None = None) -> None:
    """One pass of the pipeline over the files under ``paths`` with the run's ``worker_pool``,
    its counts and findings added to ``report``: what ``ingest`` runs (``finish_ingest`` ends it,
    as it ends a DICOMweb pull, which streams studies through the same steps). Committed studies
    are recorded as coming from ``origin`` (default: files, named by ``cfg.site``)."""
    links: list[tuple[str, str]] = []
    refs = discover(paths, links)
    report.skipped += [asdict(Rejection(where, reason, by_design=True)) for where, reason in links]
    report.files_found += len(refs)
    scratch = store.scratch_dir()
    try:
        plans, failures = _scan(pool, refs, cfg, salt, scratch, report, bar)
        t_write = time.perf_counter()
        task = bar.add_task("studies", total=len(plans))
        for batch in _batches(_build_all(pool, plans, failures, cfg, scratch), cfg.studies_per_commit):
            studies = []
            for study_rows, failed in batch:
                report.rejected += [asdict(r) for r in failed]
                if study_rows:
                    studies.append(study_rows)
                bar.advance(task)
            if before_commit is not None:
                before_commit("clips")
            commit_studies(store, studies, report, origin, cfg.site)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    add_phase(report, "write", t_write)


def finish_ingest(store: ClipStore, report: IngestReport, reports: Path | None, labels: Path | None, t0: float) -> None:
    """After the last pass: compact the clip table when due, import the report and label
    tables, time the run (from ``t0``) and keep the report in the store."""
    t_optimize = time.perf_counter()
    if report.studies_written:
        store.optimize(rewritten=report.clips_updated > 0)
    add_phase(report, "write", t_optimize)
    t_tables = time.perf_counter()
    _import_tables(store, report, reports, labels)
    add_phase(report, "tables", t_tables)
    report.seconds = round(time.perf_counter() - t0, 2)
    save_report(store.root, report)


def add_phase(report: IngestReport, phase: str, since: float) -> None:
    """Add the seconds since ``since`` to a phase of the report (several passes add up)."""
    report.phases[phase] = round(report.phases.get(phase, 0.0) + time.perf_counter() - since, 2)


def commit_studies(store: ClipStore, studies: list[list[dict]], report: IngestReport, origin: Origin | None = None,
                   site: str = "") -> None:
    """One commit of whole studies, under the store's write lock, leaving out any study
    withdrawn since (or before) its files were read: a withdrawn study stays withdrawn. The
    studies' source rows are written under the same lock (``origin``, else files of ``site``)."""
    # pyarrow and lancedb only here, in the committing process: workers import this module
    from cmr_search.store.sources import Origin, Sources

    with store.write_lock():
        withdrawn = Tombstones(store.layout).withdrawn({rows[0]["study_uid"] for rows in studies},
                                                       {rows[0]["study_uid"]: rows[0]["patient_key"] for rows in studies})
        rows = []
        for study_rows in studies:
            uid = study_rows[0]["study_uid"]
            if uid in withdrawn:
                report.skipped.append(asdict(Rejection(
                    f"study {uid}", "withdrawn from this store (cmr delete); an operator readmits it with "
                    "`cmr delete --readmit --study <study_uid>`", study_uid=uid, by_design=True)))
                continue
            report.studies_written += 1
            rows += study_rows
            for r in study_rows:
                report.views[r["view"]] = report.views.get(r["view"], 0) + 1
        inserted, updated, unchanged = store.upsert_clips(rows, skip_unchanged=True)
        Sources(store).record([s[0]["study_uid"] for s in studies if s[0]["study_uid"] not in withdrawn],
                              origin or Origin.files(site))
    report.clips_inserted += inserted
    report.clips_updated += updated
    report.clips_unchanged += unchanged


def ingest_into(paths: list[Path], root: Path, cfg: IngestConfig, configured_salt: SecretStr | str | None = None,
                reports: Path | None = None, labels: Path | None = None, progress: bool = True,
                origin: Origin | None = None) -> IngestReport:
    """``ingest`` into the store at ``root`` (created if new), patients keyed with the
    configured salt, else the store's own: what ``cmr ingest``, ``cmr demo`` and a DICOM push
    (``origin``) run."""
    # lancedb only here: forked workers preload this module and must not inherit its runtime
    from cmr_search.store.clip_store import ClipStore

    root = Path(root)
    made = [p for p in (root, *root.parents) if not p.exists()]  # what this call creates
    require_paths(paths)  # a mistyped path fails before any store is made
    try:
        store = ClipStore.open(root, cfg.clip, create=True)
        salt = patient_salt(store.layout, configured_salt)
        report = ingest(paths, store, cfg, salt, reports=reports, labels=labels, progress=progress, origin=origin)
    except BaseException:
        if made:  # a store this call began and did not finish is not left behind half-made
            shutil.rmtree(made[-1], ignore_errors=True)
        raise
    return report


def _scan(pool, refs, cfg: IngestConfig, salt: bytes, scratch: Path, report: IngestReport, bar) -> tuple[list[StudyPlan], dict]:
    """Pass over all files (one read each) and plan every study from the headers."""
    t0 = time.perf_counter()
    task = bar.add_task("files", total=len(refs))
    headers: list[FileHeader] = []
    failures: dict = {}
    units = units_of(refs, max_files=cfg.max_files_per_unit)
    for result in share_work(pool, partial(scan_unit, salt=salt, cfg=cfg, scratch=scratch), units, depth=2 * cfg.workers):
        headers += result.headers
        failures.update(result.failures)
        for r in result.rejections:
            (report.skipped if r.by_design else report.rejected).append(asdict(r))
        bar.advance(task, result.files)
    report.files_read += len(headers)
    add_phase(report, "read", t0)
    return plan_studies(headers, cfg, report), failures


def plan_studies(headers: list[FileHeader], cfg: IngestConfig, report: IngestReport) -> list[StudyPlan]:
    """The shuffle by StudyInstanceUID and each study's plan, what either path does once every
    header is read; the studies with clips to build (the plans' skips, rejections and notes
    go to ``report``)."""
    t0 = time.perf_counter()
    studies = group_by_study(headers)
    report.studies_found += len(studies)
    plans = [plan_study(h, cfg.min_frames, cfg.allow_partial) for h in studies.values()]
    for plan in plans:
        report.skipped += [asdict(r) for r in plan.skipped]
        report.rejected += [asdict(r) for r in plan.rejected]
        report.warnings += plan.notes
    add_phase(report, "plan", t0)
    return [p for p in plans if p.clips]


def _build_all(pool, plans: list[StudyPlan], failures: dict, cfg: IngestConfig, scratch: Path) -> Iterator[tuple[list[dict], list[Rejection]]]:
    """Every study's rows. A study whose clips were all cut in the scan is only loaded from
    scratch, cheaper here than pickled back from a worker (a 16-study run's 58 MB of clips);
    studies with series split across folders are read again in the pool meanwhile."""
    local, remote = [], []
    for plan in plans:
        keys = [frames_key(c.series_uid, c.series_slice, c.frames) for c in plan.clips]
        job = (plan, {k: failures[k] for k in keys if k in failures})
        done = all(k in failures or (scratch / f"{k}.npy").exists() for k in keys)
        (local if done or pool is None else remote).append(job)
    results = pool_map(pool, partial(_build_job, cfg=cfg, scratch=scratch), remote, chunksize=4)  # submitted now
    yield from (_build_job(job, cfg, scratch) for job in local)
    yield from results


def _build_job(job: tuple, cfg: IngestConfig, scratch: Path):
    plan, failures = job
    return build_study(plan, cfg, scratch, failures)


def _import_tables(store: ClipStore, report: IngestReport, reports: Path | None, labels: Path | None) -> None:
    known = store.study_uids()
    for name, path in (("reports", reports), ("labels", labels)):
        if path is None:
            continue
        result = store.import_reports(path) if name == "reports" else store.import_labels(path)
        setattr(report, f"{name}_imported", result.rows)
        report.warnings += [f"{name}: {p}" for p in result.problems]
        if result.columns:
            report.label_columns = result.columns
        unknown = store.table_study_uids(name) - known
        if unknown:
            report.warnings.append(f"{name}: {len(unknown)} rows for studies with no clips in the store (kept; ingest their DICOM to use them)")
