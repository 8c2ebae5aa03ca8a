"""``cmr ingest --ray``: the pipeline's steps as tasks on a Ray cluster, one commit at the end.

1. Listing: each top-level folder of the inputs is walked by a task.
2. Scan: each unit of files (a folder, at most ``max_files_per_unit``) is read once by a task
   (``units.scan_unit``), which returns the headers to the driver and keeps the clips it cut
   in Ray's object store, on the node that read the files.
3. Shuffle by StudyInstanceUID: the driver groups the headers into studies and plans each
   one (views, SAX order, repeats), as on one machine.
4. Build: each task takes a few studies with the object references of the clips cut for
   them (series split across units are read again there), and writes each new study's rows
   as Lance fragments of the clip table (``ClipStore.write_clip_fragments``).
5. Commit: the driver, holding the store's write lock, leaves out studies withdrawn since
   the run began and appends every other study's fragments in one Lance commit
   (``ClipStore.append_clip_fragments``): a reader sees the whole run or none of it. A study
   the store already holds is merged as on one machine (same clips: nothing written).

Ray retries a task whose worker died; fragments a failed attempt wrote are never committed
(so no row is lost or doubled), and a driver killed before the commit leaves the store at
its previous version. The inputs must be readable at the same paths on every node (a shared
filesystem), as the store must be.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cmr_search.core.cluster import ray_cluster
from cmr_search.core.progress import progress_bar
from cmr_search.ingest.config import IngestConfig
from cmr_search.ingest.discover import LINK_NOT_FOLLOWED, FileRef, discover, ignored_name
from cmr_search.ingest.headers import Rejection
from cmr_search.ingest.pipeline import add_phase, plan_studies
from cmr_search.ingest.report import IngestReport
from cmr_search.ingest.series import StudyPlan
from cmr_search.ingest.units import UnitResult, build_study, scan_unit, units_of

if TYPE_CHECKING:
    from cmr_search.core.layout import StoreLayout
    from cmr_search.store.clip_store import ClipStore
    from cmr_search.store.sources import Origin

__all__ = ["ingest_on_ray"]

STUDIES_PER_TASK = 4  # a build task's studies: enough work to outweigh a task's start


@dataclass
class _Built:
    """What a build task made of one study: fragments written (a new study) or rows (one the
    store holds: merged by the driver), and the series that failed."""

    study_uid: str
    patient_key: str
    fragments: list = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    clips: int = 0
    views: dict[str, int] = field(default_factory=dict)
    failed: list[Rejection] = field(default_factory=list)


def ingest_on_ray(paths: list[Path], store: ClipStore, cfg: IngestConfig, salt: bytes, report: IngestReport,
                  address: str | None, progress: bool = True, origin: Origin | None = None) -> None:
    """Ingest the files under ``paths`` into ``store`` on the Ray cluster at ``address``
    ("auto", "host:port", or None for a local one), adding to ``report`` what a file ingest
    reports; the caller ends the run (``pipeline.finish_ingest``)."""
    with ray_cluster(address) as ray, progress_bar(progress) as bar:
        t0 = time.perf_counter()
        refs = _list(ray, paths, report)
        units = units_of(refs, max_files=cfg.max_files_per_unit)
        add_phase(report, "list", t0)
        plans, clips_of, failures = _scan(ray, units, cfg, salt, report, bar)
        t_write = time.perf_counter()
        read_version = store.clips.version
        known = store.study_uids() & {p.study_uid for p in plans}
        built = _build(ray, plans, clips_of, failures, cfg, store, known, bar)
        _commit(store, built, report, read_version, origin, cfg.site)
        add_phase(report, "write", t_write)


def _list(ray, paths: list[Path], report: IngestReport) -> list[FileRef]:
    """Every candidate file: the top level here, each folder below it walked by a task."""
    top, folders, links = [], [], []
    for root in map(Path, paths):
        if not root.is_dir():
            top.append(root)
            continue
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_symlink() and entry.is_dir():
                links.append((entry.path, LINK_NOT_FOLLOWED))
            elif entry.is_dir() and not entry.name.startswith("."):
                folders.append(Path(entry.path))
            elif not ignored_name(entry.name):
                top.append(Path(entry.path))
    refs = discover(top, links) if top else []
    # a task per few folders: an archive of 100k study folders would make 100k tiny tasks
    per_task = max(1, len(folders) // (4 * max(1, int(ray.cluster_resources().get("CPU", 1)))))
    walk = ray.remote(_walk)
    for found, skipped in ray.get([walk.remote(folders[i : i + per_task]) for i in range(0, len(folders), per_task)]):
        refs += found
        links += skipped
    report.skipped += [asdict(Rejection(where, reason, by_design=True)) for where, reason in links]
    report.files_found += len(refs)
    return sorted(set(refs))


def _walk(folders: list[Path]) -> tuple[list[FileRef], list[tuple[str, str]]]:
    links: list[tuple[str, str]] = []
    return discover(folders, links), links


def _scan(ray, units: list[list[FileRef]], cfg: IngestConfig, salt: bytes, report: IngestReport,
          bar) -> tuple[list[StudyPlan], dict[FileRef, object], dict]:
    """Scan every unit on the cluster: the study plans, for each file the object reference
    of the clips its unit cut, and the pixel failures of the scan (by frames key)."""
    t0 = time.perf_counter()
    task = bar.add_task("files", total=sum(map(len, units)))
    scan = ray.remote(num_returns=2)(_scan_task)
    pending = {}
    for i, unit in enumerate(units):
        result, clips = scan.remote(unit, salt, cfg)
        pending[result] = (i, clips)
    headers, failures, clips_of = [], {}, {}
    for ref, result in _as_done(ray, list(pending)):
        i, clips = pending[ref]
        headers += result.headers
        failures.update(result.failures)
        for r in result.rejections:
            (report.skipped if r.by_design else report.rejected).append(asdict(r))
        for file in units[i]:
            clips_of[file] = clips
        bar.advance(task, result.files)
    report.files_read += len(headers)
    add_phase(report, "read", t0)
    return plan_studies(headers, cfg, report), clips_of, failures


def _scan_task(unit: list[FileRef], salt: bytes, cfg: IngestConfig) -> tuple[UnitResult, dict]:
    cut: dict = {}
    result = scan_unit(unit, salt, cfg, cut)
    return result, cut


def _build(ray, plans: list[StudyPlan], clips_of: dict, failures: dict, cfg: IngestConfig, store: ClipStore,
           known: set[str], bar) -> list[_Built]:
    """Build the studies on the cluster, a few per task, each task given the clips cut for
    its studies (object references: Ray moves them to the task's node, if it is another)."""
    build = ray.remote(_build_task)
    futures = []
    for i in range(0, len(plans), STUDIES_PER_TASK):
        batch = plans[i : i + STUDIES_PER_TASK]
        cut_refs = list({id(c): c for p in batch for cp in p.clips for ref, _ in cp.frames
                         if (c := clips_of.get(ref)) is not None}.values())
        futures.append(build.remote(batch, failures, cfg, store.layout, store.clip_config, known, *cut_refs))
    task = bar.add_task("studies", total=len(plans))
    built: list[_Built] = []
    for _, done in _as_done(ray, futures):
        built += done
        bar.advance(task, len(done))
    return built


def _as_done(ray, refs: list) -> Iterator[tuple[object, object]]:
    """(reference, value) of each task as it finishes: a wait per few hundred milliseconds
    for every one ready by then (a wait per task is quadratic in an archive's tasks)."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
        yield from zip(ready, ray.get(ready))


def _build_task(plans: list[StudyPlan], failures: dict, cfg: IngestConfig, layout: StoreLayout, clip_config,
                known: set[str], *cut: dict) -> list[_Built]:
    from cmr_search.store.clip_store import ClipStore

    clips: dict = {}
    for part in cut:
        clips.update(part)
    store = ClipStore(layout, clip_config)  # the layout, not the root: it names the tables' URI on any node
    out = []
    for plan in plans:
        rows, failed = build_study(plan, cfg, clips, failures)
        built = _Built(plan.study_uid, plan.patient_key, failed=failed, clips=len(rows))
        for r in rows:
            built.views[r["view"]] = built.views.get(r["view"], 0) + 1
        if rows and plan.study_uid in known:
            built.rows = rows
        elif rows:
            built.fragments = store.write_clip_fragments(rows)
        out.append(built)
    return out


def _commit(store: ClipStore, built: list[_Built], report: IngestReport, read_version: int,
            origin: Origin | None, site: str) -> None:
    """One commit of every new study's fragments (and a merge of the studies the store
    held), under the write lock, leaving out studies withdrawn since the run began."""
    from cmr_search.store.sources import Origin, Sources
    from cmr_search.store.tombstones import Tombstones

    for b in built:
        report.rejected += [asdict(r) for r in b.failed]
    written = [b for b in built if b.clips]
    with store.write_lock():
        withdrawn = Tombstones(store.layout).withdrawn({b.study_uid for b in written},
                                                       {b.study_uid: b.patient_key for b in written})
        keep = []
        for b in written:
            if b.study_uid in withdrawn:
                report.skipped.append(asdict(Rejection(
                    f"study {b.study_uid}", "withdrawn from this store (cmr delete); an operator readmits it with "
                    "`cmr delete --readmit --study <study_uid>`", study_uid=b.study_uid, by_design=True)))
                continue
            keep.append(b)
            report.studies_written += 1
            for view, n in b.views.items():
                report.views[view] = report.views.get(view, 0) + n
        store.append_clip_fragments([f for b in keep for f in b.fragments], read_version)
        report.clips_inserted += sum(b.clips for b in keep if b.fragments)
        merged = [r for b in keep for r in b.rows]
        inserted, updated, unchanged = store.upsert_clips(merged, skip_unchanged=True)
        report.clips_inserted += inserted
        report.clips_updated += updated
        report.clips_unchanged += unchanged
        Sources(store).record([b.study_uid for b in keep], origin or Origin.files(site))
