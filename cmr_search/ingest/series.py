"""From header records to clip plans: group a study's frames into series and slices,
order each slice's frames in time, keep the last repeat, and name the views."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from cmr_search.ingest.discover import FileRef
from cmr_search.ingest.headers import FileHeader, FrameGeom, Rejection
from cmr_search.ingest.views import (
    LAX_VIEWS,
    apex_sign,
    decoy_reason,
    lax_view_from_geometry,
    looks_like_cine,
    plane_normal,
    septal_angle,
    view_from_text,
)

__all__ = ["ClipPlan", "StudyPlan", "group_by_series", "group_by_study", "plan_series", "plan_study"]

SLICE_TOLERANCE_MM = 1.0  # positions closer than this along the normal are one slice
PARALLEL_COS = 0.97  # |cos| above this: two planes are parallel (about 14 degrees)


@dataclass
class ClipPlan:
    """Everything needed to cut one canonical clip: which frames, in which order, and what view."""

    study_uid: str
    series_uid: str
    patient_key: str
    view: str
    view_source: str  # description | folder | geometry
    slice_index: int  # SAX: 0 = most basal; long axis: 0
    series_slice: int  # index of the slice inside its own series (identity with series_uid)
    n_slices: int
    frames: list[tuple[FileRef, int]]  # (file, frame index inside the file), in cycle order
    time_source: str  # trigger_time | philips_phase | temporal_index | instance_number
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    position_mm: float  # position of the slice along its normal
    series_number: int
    series_description: str
    manufacturer: str
    sex: str
    age: float | None
    study_date: str
    rr_ms: float | None  # cycle length estimated from trigger times


@dataclass
class StudyPlan:
    """The clips of one study and the series left out, with reasons."""

    study_uid: str
    patient_key: str
    clips: list[ClipPlan] = field(default_factory=list)
    skipped: list[Rejection] = field(default_factory=list)  # by design
    rejected: list[Rejection] = field(default_factory=list)  # bad input
    notes: list[str] = field(default_factory=list)  # kept, but worth a word (a second plane of one view)


@dataclass
class _Slice:
    series: FileHeader  # a representative header of the series
    frames: list[tuple[FileHeader, FrameGeom]]
    normal: np.ndarray | None
    position: float
    ordered: list[tuple[FileHeader, FrameGeom]] = field(default_factory=list)
    time_source: str = ""
    view: str | None = None
    view_source: str = ""
    series_slice: int = 0  # index among the series' own slices: with the series UID, the clip's identity


def group_by_study(headers: list[FileHeader]) -> dict[str, list[FileHeader]]:
    """Headers keyed by StudyInstanceUID, in a stable order."""
    studies: dict[str, list[FileHeader]] = defaultdict(list)
    for h in sorted(headers, key=lambda h: (h.study_uid, h.series_uid, str(h.ref))):
        studies[h.study_uid].append(h)
    return dict(studies)


def _split_slices(series: list[FileHeader]) -> list[_Slice]:
    """Split a series into slices by position along the plane normal (not SliceLocation)."""
    frames = [(h, f) for h in series for f in h.frames]
    geo = [(h, f) for h, f in frames if f.ipp is not None and f.iop is not None]
    if len(geo) < len(frames):  # no usable geometry: treat the whole series as one slice
        return [_Slice(series[0], frames, None, 0.0)]
    by_orientation: list[tuple[np.ndarray, list]] = []
    normals: dict[tuple, np.ndarray] = {}  # a series has one or a few orientations: compute each once
    for h, f in geo:
        n = normals.get(f.iop)
        if n is None:
            n = normals[f.iop] = plane_normal(f.iop)
        for normal, members in by_orientation:
            if abs(float(np.dot(normal, n))) > PARALLEL_COS:
                members.append((h, f))
                break
        else:
            by_orientation.append((n, [(h, f)]))
    slices: list[_Slice] = []
    for normal, members in by_orientation:
        members.sort(key=lambda hf: float(np.dot(hf[1].ipp, normal)))
        current: list = []
        last = None
        for h, f in members:
            pos = float(np.dot(f.ipp, normal))
            if last is not None and pos - last > SLICE_TOLERANCE_MM:
                slices.append(_Slice(series[0], current, normal, float(np.mean([np.dot(x[1].ipp, normal) for x in current]))))
                current = []
            current.append((h, f))
            last = pos
        slices.append(_Slice(series[0], current, normal, float(np.mean([np.dot(x[1].ipp, normal) for x in current]))))
    return slices


def _order_frames(sl: _Slice) -> None:
    """Order one slice's frames over the cycle; keep only the last of repeated acquisitions."""
    frames = sl.frames
    # Repeats inside one series: the same slice acquired again has a later acquisition time.
    acquisitions = sorted({f.acquisition for _, f in frames})
    if len(acquisitions) > 1:
        groups = {a: [(h, f) for h, f in frames if f.acquisition == a] for a in acquisitions}
        sizes = {len(g) for g in groups.values()}
        if len(sizes) == 1 and len(groups[acquisitions[-1]]) > 1:  # whole repeats, not one time per frame
            frames = groups[acquisitions[-1]]
    times = [f.time_ms for _, f in frames]
    phases = [f.phase for _, f in frames]
    if all(t is not None for t in times) and len(set(times)) > 1:
        key, sl.time_source = (lambda hf: (hf[1].time_ms, hf[1].order)), "trigger_time"
        values = times
    elif all(p is not None for p in phases) and len(set(phases)) > 1:
        philips = frames[0][0].manufacturer.lower().startswith("philips")
        sl.time_source = "philips_phase" if philips else "temporal_index"
        key, values = (lambda hf: (hf[1].phase, hf[1].order)), phases
    else:
        key, sl.time_source, values = (lambda hf: hf[1].order), "instance_number", None
    ordered = sorted(frames, key=key)
    if values is not None:  # duplicate time points left: keep the later instance of each
        last: dict = {}
        for hf in ordered:
            last[key(hf)[0]] = hf
        ordered = [last[k] for k in sorted(last)]
    sl.ordered = ordered


def _rr_ms(sl: _Slice) -> float | None:
    times = [f.time_ms for _, f in sl.ordered if f.time_ms is not None]
    if len(times) < 2:
        return None
    step = float(np.median(np.diff(times)))
    return float(times[-1] + step)


def plan_series(files: list[FileHeader], min_frames: int = 8) -> tuple[list[_Slice], Rejection | None]:
    """Series-level decisions: is it a cine, its slices, each slice's frames in cycle order,
    and the view its description or folder names. Returns (slices, None) for a usable cine,
    or ([], the reason it was skipped or rejected)."""
    first = files[0]
    desc = first.series_description
    where = f"series {first.series_number} '{desc}'"
    base = {"study_uid": first.study_uid, "series_uid": first.series_uid}
    reason = decoy_reason(desc, first.image_type)
    if reason:
        return [], Rejection(where, f"not a cine: {reason}", by_design=True, **base)
    if len({(h.rows, h.columns) for h in files}) > 1:
        return [], Rejection(where, "ragged frame sizes within the series; re-export it", **base)
    damaged = [h for h in files if h.pixel_problem]
    if damaged:
        return [], Rejection(str(damaged[0].ref), f"series {first.series_number} '{desc}': {len(damaged)} file(s) with bad pixel data, e.g. {damaged[0].pixel_problem}", **base)
    slices = _split_slices(files)
    for i, sl in enumerate(slices):
        sl.series_slice = i
        _order_frames(sl)
    if max(len(sl.ordered) for sl in slices) == 1:
        if first.has_inversion_time:
            return [], Rejection(where, "not a cine: late gadolinium enhancement (single phase, inversion recovery)", by_design=True, **base)
        if looks_like_cine(desc):
            return [], Rejection(where, "a cine series with a single frame per slice; the acquisition is incomplete", **base)
        return [], Rejection(where, "not a cine: no temporal dimension (one frame per slice)", by_design=True, **base)
    # an explicit time axis: trigger times, or temporal position numbers (Philips, Enhanced MR)
    timed = any(sl.time_source != "instance_number" for sl in slices)
    if not (timed or looks_like_cine(desc) or view_from_text(first.ref.folder_name)):
        return [], Rejection(where, "not a cine: no cardiac phase information (no trigger times, no cine description)", by_design=True, **base)
    if first.pixel_spacing is None:
        return [], Rejection(where, "no PixelSpacing; the field of view cannot be fixed", **base)
    short = [sl for sl in slices if len(sl.ordered) < min_frames]
    if short:
        return [], Rejection(where, f"{len(short[0].ordered)} frames in a slice; a cine needs at least {min_frames}", **base)
    text_view, folder_view = view_from_text(desc), view_from_text(first.ref.folder_name)
    for sl in slices:
        if text_view:
            sl.view, sl.view_source = text_view, "description"
        elif folder_view:
            sl.view, sl.view_source = folder_view, "folder"
    return slices, None


def group_by_series(headers: list[FileHeader]) -> dict[str, list[FileHeader]]:
    """Headers keyed by SeriesInstanceUID, in a stable order."""
    series: dict[str, list[FileHeader]] = defaultdict(list)
    for h in sorted(headers, key=lambda h: (h.series_uid, str(h.ref))):
        series[h.series_uid].append(h)
    return dict(series)


def plan_study(headers: list[FileHeader], min_frames: int = 8, allow_partial: bool = False) -> StudyPlan:
    """Decide the clips of one study from its file headers (pure; no pixels are read).

    A study with a rejected (damaged) series plans no clips unless ``allow_partial``:
    it is stored whole or not at all."""
    plan = StudyPlan(headers[0].study_uid, headers[0].patient_key)
    candidates: list[_Slice] = []
    for files in group_by_series(headers).values():
        slices, problem = plan_series(files, min_frames)
        if problem is not None:
            (plan.skipped if problem.by_design else plan.rejected).append(problem)
        candidates.extend(slices)
    _classify_by_geometry(candidates)
    _keep_last_repeats(plan, candidates)
    plan.clips = _to_clips(plan, candidates)
    if plan.rejected and plan.clips and not allow_partial:
        plan.rejected.append(
            Rejection(f"study {plan.study_uid}", f"not written: {len(plan.rejected)} series rejected (use --allow-partial to keep the rest)", plan.study_uid)
        )
        plan.clips = []
    return plan


def _classify_by_geometry(slices: list[_Slice]) -> None:
    """Name the views left unnamed: the SAX stack is the set of many parallel slices, and
    long-axis planes are roughly perpendicular to it. A plane described as "LVOT" that
    contains the LV long axis at the 3-chamber angle is the 3-chamber view (Philips names
    its 3-chamber cine "LVOT"; the SCMR protocols call the 3-chamber view the LVOT view),
    unless the study has a 3-chamber view of its own."""
    sax = [s for s in slices if s.view == "SAX" and s.normal is not None]
    unknown = [s for s in slices if s.view is None and s.normal is not None]
    if not sax:
        # the largest family of >= 4 parallel slices at distinct positions is the stack
        best: list[_Slice] = []
        for s in unknown:
            family = [t for t in unknown if abs(float(np.dot(s.normal, t.normal))) > PARALLEL_COS]
            if len({round(t.position) for t in family}) >= 4 and len(family) > len(best):
                best = family
        for s in best:
            s.view, s.view_source = "SAX", "geometry"
        sax = best
    if sax:
        axis = np.mean([s.normal * np.sign(np.dot(s.normal, sax[0].normal)) for s in sax], axis=0)
        for s in unknown:
            if s.view is None:
                s.view, s.view_source = lax_view_from_geometry(s.normal, axis), "geometry"
        _order_long_axis_planes([s for s in unknown if s.view in LAX_VIEWS], axis)
        if not any(s.view == "3CH" for s in slices):
            for s in slices:
                if s.view == "LVOT" and s.normal is not None and lax_view_from_geometry(s.normal, axis) == "3CH":
                    s.view, s.view_source = "3CH", "description+geometry"
    for s in slices:
        if s.view is None:
            s.view, s.view_source = "OTHER", "none"


def _order_long_axis_planes(lax: list[_Slice], axis: np.ndarray) -> None:
    """Three distinct long-axis planes of one study are its 2-, 3- and 4-chamber views in
    the order of their rotation away from the septum: a study's planes relative to each
    other say more than one plane against an anatomical prior (hearts sit at other angles
    in other patients, and the prior's thresholds then misname a plane)."""
    planes: list[list[_Slice]] = []
    for s in lax:
        for group in planes:
            if abs(float(np.dot(group[0].normal, s.normal))) > PARALLEL_COS:
                group.append(s)
                break
        else:
            planes.append([s])
    if len(planes) != 3:
        return
    angles = [septal_angle(group[0].normal, axis) for group in planes]
    for view, i in zip(("2CH", "3CH", "4CH"), np.argsort(angles)):
        for s in planes[i]:
            s.view = view


def _same_plane(a: _Slice, b: _Slice, mm: float = 10.0) -> bool:
    """Two slices image the same plane: parallel, and within ``mm`` of each other."""
    if a.normal is None or b.normal is None:
        return True  # without geometry nothing says they differ
    dot = float(np.dot(a.normal, b.normal))
    return abs(dot) > PARALLEL_COS and abs(a.position - np.sign(dot) * b.position) <= mm


def _keep_last_repeats(plan: StudyPlan, slices: list[_Slice]) -> None:
    """Where a view (or a SAX slice position) was acquired again in the same plane, keep
    the last acquisition. Two series given the same view in different planes are both kept
    and reported: a view named by geometry, or a second plane the protocol added, is not a
    repeat, and dropping it would lose a cine without a word."""
    def later(s: _Slice):
        return (s.series.series_time, s.series.series_number)

    groups: dict[tuple, list[_Slice]] = defaultdict(list)
    for s in slices:
        if s.view == "SAX":
            groups[("SAX", round(s.position / 4.0))].append(s)  # same position within ~4 mm
        elif s.view != "OTHER":
            groups[(s.view,)].append(s)
    dropped: set[int] = set()
    for members in groups.values():
        if len({m.series.series_uid for m in members}) < 2:
            continue
        keep = max(members, key=later)
        for m in members:
            if m.series.series_uid == keep.series.series_uid or id(m) in dropped:
                continue
            where = f"series {m.series.series_number} '{m.series.series_description}'"
            if m.view == "SAX" or _same_plane(m, keep):
                dropped.add(id(m))
                plan.skipped.append(Rejection(
                    where, f"superseded by a later acquisition of the same {m.view} view in the same plane "
                    f"(series {keep.series.series_number})", study_uid=plan.study_uid,
                    series_uid=m.series.series_uid, by_design=True))
            else:
                m.view_source += ", duplicate"
                plan.notes.append(f"study {plan.study_uid}: series {m.series.series_number} and "
                                  f"{keep.series.series_number} are both {m.view} views in different planes; "
                                  "both kept (view_source says 'duplicate')")
    slices[:] = [s for s in slices if id(s) not in dropped]


def _to_clips(plan: StudyPlan, slices: list[_Slice]) -> list[ClipPlan]:
    sax = [s for s in slices if s.view == "SAX"]
    if sax:
        ref_normal = sax[0].normal if sax[0].normal is not None else np.array([0.0, 0.0, 1.0])
        sign = apex_sign(ref_normal)
        # positions measured along one common normal, then ordered base -> apex
        sax.sort(key=lambda s: sign * (s.position if s.normal is None else s.position * np.sign(np.dot(s.normal, ref_normal))))
    clips = []
    for s in slices:
        h = s.series
        idx = sax.index(s) if s.view == "SAX" else 0
        clips.append(
            ClipPlan(
                study_uid=plan.study_uid,
                series_uid=h.series_uid,
                patient_key=plan.patient_key,
                view=s.view,
                view_source=s.view_source,
                slice_index=idx,
                series_slice=s.series_slice,
                n_slices=len(sax) if s.view == "SAX" else 1,
                frames=[(fh.ref, f.file_frame) for fh, f in s.ordered],
                time_source=s.time_source,
                rows=h.rows,
                columns=h.columns,
                pixel_spacing=h.pixel_spacing,
                position_mm=s.position,
                series_number=h.series_number,
                series_description=h.series_description,
                manufacturer=h.manufacturer,
                sex=h.sex,
                age=h.age,
                study_date=h.study_date,
                rr_ms=_rr_ms(s),
            )
        )
    return clips
