"""The work on one unit of files and on one study, the same wherever it runs: a process
pool's worker (``pipeline``) or a task on a Ray cluster (``cluster``).

A unit is a folder's (or a zip folder's) files: each is read once, with its pixel bytes,
and the clips of every cine series complete inside the unit are cut from the pixels in
memory. Those clips go to ``cut``: a folder of ``<frames_key>.npy`` (a process pool hands
them to the committing process through the disk) or a dict (a cluster task returns them
through Ray's object store). A study is then built from its plan: clips cut in the scan are
taken from there, series split across units are read again.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections import defaultdict
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmr_search.ingest.clips import PixelError, clip_frames, decode_stack, make_clip, read_frames
from cmr_search.ingest.config import IngestConfig
from cmr_search.ingest.discover import FileRef
from cmr_search.ingest.headers import FileHeader, Rejection, read_header
from cmr_search.ingest.series import ClipPlan, StudyPlan, group_by_series, plan_series

__all__ = ["Cut", "UnitResult", "build_study", "clip_id", "frames_key", "scan_unit", "units_of", "was_cut"]

#: where the clips cut in a scan go: a scratch folder of .npy files, or a dict in memory
Cut = Path | MutableMapping[str, np.ndarray]


def clip_id(series_uid: str, series_slice: int) -> str:
    """Stable id of a clip: hash of the series UID and the slice's index inside the series."""
    return hashlib.sha1(f"{series_uid}:{series_slice}".encode()).hexdigest()[:24]


def _row(plan: ClipPlan, clip, cfg: IngestConfig) -> dict:
    return {
        "clip_id": clip_id(plan.series_uid, plan.series_slice),
        "study_uid": plan.study_uid,
        "series_uid": plan.series_uid,
        "patient_key": plan.patient_key,
        "view": plan.view,
        "view_source": plan.view_source,
        "slice_index": plan.slice_index,
        "n_slices": plan.n_slices,
        "series_slice": plan.series_slice,
        "frames": clip.shape[0],
        "height": clip.shape[1],
        "width": clip.shape[2],
        "clip": clip.tobytes(),
        "source_frames": len(plan.frames),
        "time_source": plan.time_source,
        "row_spacing_mm": plan.pixel_spacing[0],
        "col_spacing_mm": plan.pixel_spacing[1],
        "clip_spacing_mm": cfg.clip.fov_mm / cfg.clip.size,
        "position_mm": plan.position_mm,
        "rr_ms": plan.rr_ms,
        "series_number": plan.series_number,
        "series_description": plan.series_description,
        "vendor": plan.manufacturer,
        "site": cfg.site,
        "sex": plan.sex,
        "age": plan.age,
        "study_date": plan.study_date,
    }


def frames_key(series_uid: str, series_slice: int, frames: list[tuple[FileRef, int]]) -> str:
    """Digest of exactly which frames make a clip: a clip built by a worker is reused only
    when the study plan asks for the very same frames in the same order."""
    text = f"{series_uid}:{series_slice}:" + "|".join(f"{ref}#{i}" for ref, i in frames)
    return hashlib.sha1(text.encode()).hexdigest()[:24]


@dataclass
class UnitResult:
    """What one worker learned from one folder (or zip) of files in a single read of each."""

    headers: list[FileHeader] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)  # frames_key -> (where, error)
    files: int = 0


def scan_unit(refs: list[FileRef], salt: bytes, cfg: IngestConfig, scratch: Cut) -> UnitResult:
    """Read each file once: parse its header and, for every complete cine slice found inside
    this unit, cut the canonical clip from the pixels already in memory (kept in ``scratch``).

    Series split across units are left to the study pass, which reads their files again.
    """
    with _gc_paused():
        return _scan_unit(refs, salt, cfg, scratch)


def _scan_unit(refs: list[FileRef], salt: bytes, cfg: IngestConfig, scratch: Cut) -> UnitResult:
    out = UnitResult(files=len(refs))
    datasets: dict[FileRef, object] = {}
    for ref in refs:
        header, ds = read_header(ref, salt, pixels=True)
        if isinstance(header, Rejection):
            out.rejections.append(header)
        else:
            out.headers.append(header)
            datasets[ref] = ds
    for files in group_by_series(out.headers).values():
        slices, _problem = plan_series(files, cfg.min_frames)
        for sl in slices:  # a problem is re-derived (once, for the whole series) by plan_study
            frames = [(h.ref, f.file_frame) for h, f in sl.ordered]
            key = frames_key(files[0].series_uid, sl.series_slice, frames)
            try:
                # only the frames the clip keeps are decoded; the rest were parsed, never decoded
                stack = decode_stack(clip_frames(frames, cfg.clip), files[0].rows, files[0].columns, datasets.__getitem__)
                clip = make_clip(stack, files[0].pixel_spacing, cfg.clip)
                if isinstance(scratch, Path):
                    np.save(scratch / f"{key}.npy", clip)
                else:
                    scratch[key] = clip
            except PixelError as err:
                out.failures[key] = (err.where, str(err))
    return out


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a unit's files are parsed and cut: pydicom
    allocates millions of small objects, and the collections they triggered walked every live
    object (the process's modules, the headers so far) at a cost of ~15 % of the read
    (measured: docs/BENCHMARKS.md). The unit's datasets live until it ends anyway."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_study(plan: StudyPlan, cfg: IngestConfig, scratch: Cut, failures: dict) -> tuple[list[dict], list[Rejection]]:
    """Collect (or, for series split across folders, cut) every clip of a study. A failed
    cine series fails the whole study unless ``cfg.allow_partial``: stored whole or not at all."""
    rows, failed = [], []
    for cp in plan.clips:
        key = frames_key(cp.series_uid, cp.series_slice, cp.frames)
        try:
            if key in failures:
                raise PixelError(failures[key][1], failures[key][0])
            clip = was_cut(scratch, key)
            if clip is None:
                clip = make_clip(read_frames(cp, cfg.clip), cp.pixel_spacing, cfg.clip)
            rows.append(_row(cp, clip, cfg))
        except PixelError as err:
            where = err.where or f"series {cp.series_number} '{cp.series_description}'"
            failed.append(Rejection(where, f"series {cp.series_number}: {err}", plan.study_uid, cp.series_uid))
    if failed and not cfg.allow_partial and rows:
        failed.append(Rejection(f"study {plan.study_uid}", f"not written: {len(failed)} cine series failed (use --allow-partial to keep the rest)", plan.study_uid))
        rows = []
    return rows, failed


def units_of(refs: list[FileRef], max_files: int) -> list[list[FileRef]]:
    """Group files by folder (or zip member folder), at most ``max_files`` per unit: exports
    keep a series in one folder, so most series are complete inside one unit."""
    groups: dict[tuple, list[FileRef]] = defaultdict(list)
    for ref in refs:
        folder = os.path.dirname(ref.member) if ref.member else os.path.dirname(ref.path)
        groups[(ref.path if ref.member else "", folder)].append(ref)
    units = []
    for members in groups.values():
        units += [members[i : i + max_files] for i in range(0, len(members), max_files)]
    # largest first: the pool then ends on small units and no worker idles at the end
    return sorted(units, key=len, reverse=True)




def was_cut(scratch: Cut, key: str) -> np.ndarray | None:
    """The clip of ``frames_key`` cut in the scan, else None (its series was split)."""
    if isinstance(scratch, Path):
        path = scratch / f"{key}.npy"
        return np.load(path) if path.exists() else None
    return scratch.get(key)
