"""``cmr ingest``: DICOM files -> studies -> cine slices -> canonical clips in the store.

Two passes over a process pool: headers only (decides every clip and skips decoys without
decoding them), then pixels per study. Each batch of whole studies is one Lance commit, so
an interrupted run leaves every study either fully written or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from indexer.clip_store import ClipStore
from indexer.clips import PixelError, make_clip, read_frames
from indexer.config import IngestConfig
from indexer.discover import discover
from indexer.headers import FileHeader, Rejection, read_header
from indexer.series import ClipPlan, StudyPlan, group_by_study, plan_study

__all__ = ["IngestReport", "ingest", "clip_id", "build_study"]

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """What an ingest run did: counts, and every skipped or rejected input with its reason."""

    files_found: int = 0
    files_read: int = 0
    studies_found: int = 0
    studies_written: int = 0
    clips_inserted: int = 0
    clips_updated: int = 0
    views: dict[str, int] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # by design: localizers, LGE, flow, repeats
    rejected: list[dict] = field(default_factory=list)  # bad input
    reports_imported: int = 0
    labels_imported: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every input was usable, 3 when some were rejected (DESIGN.md)."""
        return 3 if self.rejected else 0

    def to_dict(self, with_paths: bool = True) -> dict:
        """JSON-ready dict; without paths for the copy kept in the store (paths can name patients)."""
        d = asdict(self)
        d["exit_code"] = self.exit_code
        if not with_paths:
            for item in d["skipped"] + d["rejected"]:
                if not item["where"].startswith(("series ", "study ")):
                    item["where"] = "file (path withheld)"
        return d


def clip_id(series_uid: str, series_slice: int) -> str:
    """Stable id of a clip: hash of the series UID and the slice's index inside the series."""
    return hashlib.sha1(f"{series_uid}:{series_slice}".encode()).hexdigest()[:24]


def _row(plan: ClipPlan, clip, cfg: IngestConfig) -> dict:
    return dict(
        clip_id=clip_id(plan.series_uid, plan.series_slice),
        study_uid=plan.study_uid,
        series_uid=plan.series_uid,
        patient_key=plan.patient_key,
        view=plan.view,
        view_source=plan.view_source,
        slice_index=plan.slice_index,
        n_slices=plan.n_slices,
        series_slice=plan.series_slice,
        frames=clip.shape[0],
        height=clip.shape[1],
        width=clip.shape[2],
        clip=clip.tobytes(),
        source_frames=len(plan.frames),
        time_source=plan.time_source,
        row_spacing_mm=plan.pixel_spacing[0],
        col_spacing_mm=plan.pixel_spacing[1],
        clip_spacing_mm=cfg.clip.fov_mm / cfg.clip.size,
        position_mm=plan.position_mm,
        rr_ms=plan.rr_ms,
        series_number=plan.series_number,
        series_description=plan.series_description,
        vendor=plan.manufacturer,
        site=cfg.site,
        sex=plan.sex,
        age=plan.age,
        study_date=plan.study_date,
    )


def build_study(plan: StudyPlan, cfg: IngestConfig) -> tuple[list[dict], list[Rejection]]:
    """Decode and cut every clip of a study. A failed cine series fails the whole study
    unless ``cfg.allow_partial``: a study is stored whole or not at all."""
    rows, failed = [], []
    for cp in plan.clips:
        try:
            rows.append(_row(cp, make_clip(read_frames(cp), cp.pixel_spacing, cfg.clip), cfg))
        except PixelError as err:
            where = err.where or f"series {cp.series_number} '{cp.series_description}'"
            failed.append(Rejection(where, f"series {cp.series_number}: {err}", plan.study_uid, cp.series_uid))
    if failed and not cfg.allow_partial and rows:
        failed.append(Rejection(f"study {plan.study_uid}", f"not written: {len(failed)} cine series failed (use --allow-partial to keep the rest)", plan.study_uid))
        rows = []
    return rows, failed


def _pool_map(fn: Callable, items: list, workers: int, chunksize: int) -> Iterator:
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    # forkserver: the parent holds Lance's native threads, which fork() would copy mid-lock
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(fn, items, chunksize=chunksize)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _batches(results: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in results:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest(
    paths: list[Path],
    store: ClipStore,
    cfg: IngestConfig,
    salt: bytes,
    reports: Path | None = None,
    labels: Path | None = None,
    progress: bool = True,
) -> IngestReport:
    """Ingest DICOM under ``paths`` (folders, zips, files) into ``store``; never raises on bad files."""
    t0 = time.perf_counter()
    report = IngestReport()
    refs = discover(paths)
    report.files_found = len(refs)
    headers: list[FileHeader] = []
    with _progress(progress) as bar:
        task = bar.add_task("headers", total=len(refs))
        for result in _pool_map(partial(read_header, salt=salt), refs, cfg.workers, chunksize=64):
            if isinstance(result, Rejection):
                (report.skipped if result.by_design else report.rejected).append(asdict(result))
            else:
                headers.append(result)
            bar.advance(task)
        report.files_read = len(headers)

        studies = group_by_study(headers)
        report.studies_found = len(studies)
        plans = [plan_study(h, cfg.min_frames) for h in studies.values()]
        del headers, studies
        for plan in plans:
            report.skipped += [asdict(r) for r in plan.skipped]
            report.rejected += [asdict(r) for r in plan.rejected]
        plans = [p for p in plans if p.clips]

        task = bar.add_task("clips", total=len(plans))
        results = _pool_map(partial(build_study, cfg=cfg), plans, cfg.workers, chunksize=1)
        for batch in _batches(results, cfg.studies_per_commit):
            rows = []
            for study_rows, failed in batch:
                report.rejected += [asdict(r) for r in failed]
                if study_rows:
                    report.studies_written += 1
                    rows += study_rows
                    for r in study_rows:
                        report.views[r["view"]] = report.views.get(r["view"], 0) + 1
                bar.advance(task)
            inserted, updated = store.upsert_clips(rows)
            report.clips_inserted += inserted
            report.clips_updated += updated
    if report.studies_written:
        store.optimize()

    known = store.study_uids()
    for name, path in (("reports", reports), ("labels", labels)):
        if path is None:
            continue
        result = store.import_reports(path) if name == "reports" else store.import_labels(path)
        setattr(report, f"{name}_imported", result.rows)
        report.warnings += [f"{name}: {p}" for p in result.problems]
        unknown = store.table_study_uids(name) - known
        if unknown:
            report.warnings.append(f"{name}: {len(unknown)} rows for studies with no clips in the store (kept; ingest their DICOM to use them)")
    report.seconds = round(time.perf_counter() - t0, 2)
    _save(store, report)
    return report


def _save(store: ClipStore, report: IngestReport) -> None:
    folder = store.root / "ingest_reports"
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (folder / f"ingest-{stamp}.json").write_text(json.dumps(report.to_dict(with_paths=False), indent=1))
