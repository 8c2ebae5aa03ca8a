"""Writing a study's series as DICOM files: classic MR or enhanced multi-frame MR.

Identity (UIDs, dates, dummy PHI) is derived from the cohort seed and the study
index only, so a cohort is byte-identical for a given seed. Every patient
identifier contains "ZZSYNTH" so tests can prove that ingestion drops them.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cmr_search.synth.dicom_encode import (
    ENCAPSULATED,
    IMPLICIT_VR_LE,
    Element,
    compress_frame,
    data_element,
    encapsulated_pixel_element,
    encode_cached,
    encode_element,
    encode_elements,
    encode_file,
    encode_item,
    encoded_parts,
    file_meta,
    file_meta_from,
    format_ds,
    meta_template,
    native_pixel_element,
    raw_item,
    raw_sequence,
)
from cmr_search.synth.params import StudyParams
from cmr_search.synth.protocol import SeriesPlan, StudyProtocol

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
BITS_STORED = 12
MAX_STORED = (1 << BITS_STORED) - 1
PHILIPS_CREATOR = "Philips Imaging DD 001"
VENC_CM_S = 150.0
_UID_NAMESPACE = uuid.UUID("6f1e4b52-3c1a-5d0e-9a7b-2f4c8e9d1a30")

TRUTH_COLUMNS = ("study_uid", "series_uid", "series_description", "style", "kind", "view",
                 "slice_index", "n_frames", "n_slices", "superseded", "enhanced",
                 "transfer_syntax")


@dataclass(frozen=True)
class StudyIdentity:
    """Study-level identifiers and the dummy PHI written into every file."""

    seed: int | str  # the cohort seed, with another site's name: "0/external" (see study_identity)
    study_index: int
    study_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    accession: str
    institution: str
    referring_physician: str


def uid(seed: int | str, *parts) -> str:
    """Deterministic UID under 2.25 from the cohort seed and a path of parts.

    A name-based (SHA-1, version 5) UUID as a 2.25 OID. pydicom's generate_uid
    ignores entropy_srcs when prefix is None and would return a random UUID.
    """
    name = "/".join(["cmr-synth", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


DEFAULT_INSTITUTION = "ZZSYNTH Heart Institute"


def study_identity(params: StudyParams, seed: int, study_date: str, *,
                   institution: str = DEFAULT_INSTITUTION, namespace: str = "") -> StudyIdentity:
    """UIDs and dummy PHI of one study; visits of one patient share the patient fields.

    `namespace` (another site's name; empty for the default cohort) goes into every UID
    and the PatientID, so that a cohort of another site with the same seed never shares
    a study, series or patient with the default one when both go into one store.
    """
    i, p = params.study_index, params.patient_number
    key: int | str = f"{seed}/{namespace}" if namespace else seed
    year = int(study_date[:4]) - int(params.age)
    day_of_year = (p * 97) % 365
    birth = np.datetime64(f"{year}-01-01") + np.timedelta64(day_of_year, "D")
    accession = f"ZZSYNTH-ACC-{i:04d}" if i < 10000 else f"ZZSYNTH{i:09d}"
    return StudyIdentity(
        seed=key, study_index=i,
        study_uid=uid(key, "study", i),
        frame_of_reference_uid=uid(key, "for", i),
        patient_name=f"ZZSYNTH^PATIENT{p:06d}",
        patient_id=f"ZZSYNTH-PID-{p:06d}" if not namespace else f"ZZSYNTH-PID-{namespace}-{p:06d}",
        birth_date=str(birth).replace("-", ""),
        accession=accession,
        institution=institution,
        referring_physician="ZZSYNTH^REFERRER",
    )


def to_stored(signal: np.ndarray, gain: float, slope: float, intercept: float = 0.0):
    """Signal (blood ~ 1) -> 12-bit stored values whose rescaled value is signal * gain."""
    stored = signal * np.float32(gain / slope)
    # truncating x + 0.5 rounds non-negative values
    stored += np.float32(0.5 - intercept / slope)
    np.clip(stored, 0.0, MAX_STORED + 0.49, out=stored)
    return stored.astype(np.uint16)


def phase_to_stored(velocity_fraction: np.ndarray) -> np.ndarray:
    """Velocity / VENC in [-1, 1] -> stored values (rescale gives cm/s)."""
    return np.clip(np.rint((velocity_fraction + 1.0) * 2048.0), 0, MAX_STORED).astype(np.uint16)


def _time(study_time: str, minutes: float) -> str:
    total = int(study_time[:2]) * 3600 + int(study_time[2:4]) * 60 + round(minutes * 60)
    return f"{total // 3600 % 24:02d}{total // 60 % 60:02d}{total % 60:02d}.000000"


def _series_elements(ident: StudyIdentity, proto: StudyProtocol, plan: SeriesPlan,
                     params: StudyParams, rows: int, cols: int, series_uid: str) -> list:
    """Elements shared by every file of a series (classic and enhanced alike)."""
    pl = plan.planes[0]
    series_time = _time(proto.study_time, plan.minutes)
    rr_ms = 60000.0 / params.heart_rate_bpm
    phase = plan.contrast == "flow_phase"
    slope = 2 * VENC_CM_S / 4096 if phase else proto.rescale_slope
    intercept = -VENC_CM_S if phase else proto.rescale_intercept
    center = 0.0 if phase else 0.55 * params.signal_gain
    width = 2 * VENC_CM_S if phase else 1.3 * params.signal_gain
    tr, te, flip = ((3.1, 1.3, 55.0) if plan.contrast == "cine" and plan.kind == "cine"
                    else (6.0, 2.5, 20.0) if plan.kind != "lge" else (700.0, 3.2, 25.0))
    e: list[Element] = [
        (0x00080005, "CS", "ISO_IR 100"),
        (0x00080008, "CS", list(plan.image_type)),
        (0x00080012, "DA", proto.study_date),
        (0x00080013, "TM", series_time),
        (0x00080016, "UI", ENHANCED_MR_IMAGE_STORAGE if plan.enhanced else MR_IMAGE_STORAGE),
        (0x00080020, "DA", proto.study_date),
        (0x00080021, "DA", proto.study_date),
        (0x00080022, "DA", proto.study_date),
        (0x00080023, "DA", proto.study_date),
        (0x00080030, "TM", proto.study_time + ".000000"),
        (0x00080031, "TM", series_time),
        (0x00080032, "TM", series_time),
        (0x00080033, "TM", series_time),
        (0x00080050, "SH", ident.accession),
        (0x00080060, "CS", "MR"),
        (0x00080070, "LO", proto.manufacturer),
        (0x00080080, "LO", ident.institution),
        (0x00080090, "PN", ident.referring_physician),
        (0x00081010, "SH", "ZZSYNTH-MR1"),
        (0x00081030, "LO", "CARDIAC MRI"),
        (0x0008103E, "LO", plan.description),
        (0x00081070, "PN", "ZZSYNTH^OPERATOR"),
        (0x00081090, "LO", proto.model),
        (0x00100010, "PN", ident.patient_name),
        (0x00100020, "LO", ident.patient_id),
        (0x00100030, "DA", ident.birth_date),
        (0x00100040, "CS", params.sex),
        (0x00101010, "AS", f"{int(params.age):03d}Y"),
        (0x00101020, "DS", round(params.height_cm / 100, 2)),
        (0x00101030, "DS", round(params.weight_kg, 1)),
        (0x00180020, "CS", "GR"),
        (0x00180021, "CS", "SS"),
        (0x00180022, "CS", "CG"),
        (0x00180023, "CS", "2D"),
        (0x00180024, "SH", "*tfi2d1" if plan.kind == "cine" else "*fl2d1"),
        (0x00180050, "DS", pl.thickness),
        (0x00180080, "DS", tr),
        (0x00180081, "DS", te),
        (0x00180087, "DS", proto.field_strength),
        (0x00181020, "LO", proto.software),
        (0x00181314, "DS", flip),
        (0x00185100, "CS", "HFS"),
        (0x0020000D, "UI", ident.study_uid),
        (0x0020000E, "UI", series_uid),
        (0x00200010, "SH", f"{ident.study_index + 1}"),
        (0x00200011, "IS", plan.series_number),
        (0x00200012, "IS", 1),
        (0x00200037, "DS", [*pl.row_dir, *pl.col_dir]),
        (0x00200052, "UI", ident.frame_of_reference_uid),
        (0x00201040, "LO", ""),
        (0x00280002, "US", 1),
        (0x00280004, "CS", "MONOCHROME2"),
        (0x00280010, "US", rows),
        (0x00280011, "US", cols),
        (0x00280030, "DS", [pl.spacing, pl.spacing]),
        (0x00280100, "US", 16),
        (0x00280101, "US", BITS_STORED),
        (0x00280102, "US", BITS_STORED - 1),
        (0x00280103, "US", 0),
        (0x00281050, "DS", round(center, 1)),
        (0x00281051, "DS", round(width, 1)),
        (0x00281052, "DS", round(intercept, 6)),
        (0x00281053, "DS", round(slope, 6)),
        (0x00281054, "LO", "cm/s" if phase else "US"),
    ]
    if plan.kind != "localizer":
        e += [(0x00181062, "IS", round(rr_ms)), (0x00181088, "IS", round(params.heart_rate_bpm)),
              (0x00181090, "IS", len(plan.frames))]
    if len(plan.planes) > 1 and plan.kind != "localizer":
        gap = abs(float(np.dot(plan.planes[1].position - plan.planes[0].position,
                               plan.planes[0].normal)))
        e.append((0x00180088, "DS", round(gap, 4)))
    if plan.inversion_time is not None:
        e.append((0x00180082, "DS", plan.inversion_time))
    if plan.private_phase:
        e.append((0x20010010, "LO", PHILIPS_CREATOR))
    return e


def _instance_numbers(plan: SeriesPlan) -> np.ndarray:
    """InstanceNumber (1-based) of each (plane, frame), shape (n_planes, n_frames)."""
    n_p, n_t = len(plan.planes), len(plan.frames)
    p, t = np.meshgrid(np.arange(n_p), np.arange(n_t), indexing="ij")
    if plan.order == "phase_major":
        return t * n_p + p + 1
    if plan.order == "slice_major":
        return p * n_t + t + 1
    if plan.order == "rotated":  # acquisition started mid-cycle; only TriggerTime orders it
        shift = 1 + plan.series_number * 7 % max(n_t - 1, 1)
        return p * n_t + (t + shift) % n_t + 1
    return p * n_t + t + 1


def write_series(series_dir: Path, ident: StudyIdentity, proto: StudyProtocol,
                 plan: SeriesPlan, params: StudyParams, stored: np.ndarray) -> dict:
    """Write one series (stored: uint16 (n_planes, n_frames, rows, cols)); its truth row."""
    series_dir.mkdir(parents=True, exist_ok=True)
    series_uid = uid(ident.seed, "series", ident.study_index, plan.series_number, plan.repeat)
    rows, cols = stored.shape[-2:]
    common = _series_elements(ident, proto, plan, params, rows, cols, series_uid)
    rr_ms = 60000.0 / params.heart_rate_bpm
    times = [round(f * rr_ms / params.n_frames, 2) for f in plan.frames]
    if plan.enhanced:
        _write_enhanced(series_dir, ident, plan, common, stored, times)
    else:
        _write_classic(series_dir, ident, plan, common, stored, times)
    return {
        "study_uid": ident.study_uid, "series_uid": series_uid,
        "series_description": plan.description, "style": proto.style, "kind": plan.kind,
        "view": plan.view,
        "slice_index": "" if plan.slice_index is None else plan.slice_index,
        "n_frames": len(plan.frames), "n_slices": len(plan.planes),
        "superseded": int(plan.superseded), "enhanced": int(plan.enhanced),
        "transfer_syntax": plan.transfer_syntax,
    }


def _write_file(path: Path, data: bytes) -> None:
    # os-level calls: creating ~10^5 small files, Python's buffered open is the slower part
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _slice_location(plane) -> float:
    center = plane.position + 0.5 * plane.spacing * (
        (plane.cols - 1) * plane.row_dir + (plane.rows - 1) * plane.col_dir)
    return round(float(center @ plane.normal), 4)


def _write_classic(series_dir, ident, plan, common, stored, times) -> None:
    ts = plan.transfer_syntax
    implicit = ts == IMPLICIT_VR_LE
    static = encoded_parts(common, implicit)
    numbers = _instance_numbers(plan)
    triggered = plan.kind != "localizer" and not plan.private_phase
    meta = meta_template(MR_IMAGE_STORAGE, ts)
    trigger = [encode_cached(0x00181060, "DS", format_ds(t), implicit) for t in times]
    phase = [encode_cached(0x20011008, "IS", k + 1, implicit) for k in range(len(times))]
    per_file = (0x00080018, 0x00200013) + ((0x00181060,) if triggered else ()) + (
        (0x20011008,) if plan.private_phase else ())
    for p, plane in enumerate(plan.planes):
        parts = dict(static)
        parts[0x00200032] = encode_element(0x00200032, "DS", list(plane.position), implicit)
        parts[0x00201041] = encode_element(0x00201041, "DS", _slice_location(plane), implicit)
        layout = _layout(parts, per_file)
        for k in range(len(times)):
            n = int(numbers[p, k])
            sop = uid(ident.seed, "sop", ident.study_index, plan.series_number, plan.repeat, n)
            changing = {0x00080018: data_element(0x00080018, "UI", sop),
                        0x00200013: encode_cached(0x00200013, "IS", n, implicit),
                        0x00181060: trigger[k], 0x20011008: phase[k]}
            frame = stored[p, k]
            if ts in ENCAPSULATED:
                pixels = encapsulated_pixel_element([compress_frame(frame, ts, BITS_STORED)])
            else:
                pixels = native_pixel_element(frame)
            pieces = [changing[x] if isinstance(x, int) else x for x in layout]
            _write_file(series_dir / f"IM_{n:04d}.dcm", encode_file(
                file_meta_from(*meta, sop), [*pieces, pixels], implicit))


def _layout(static: dict[int, bytes], per_file: tuple[int, ...]) -> list:
    """Tag order of a file: runs of encoded static elements joined, per-file tags between."""
    layout: list = []
    for tag in sorted({*static, *per_file}):
        if tag in per_file:
            layout.append(tag)
        elif layout and isinstance(layout[-1], bytes):
            layout[-1] += static[tag]
        else:
            layout.append(static[tag])
    return layout


def _write_enhanced(series_dir, ident, plan, common, stored, times) -> None:
    """One multi-frame Enhanced MR file with shared and per-frame functional groups."""
    ts = plan.transfer_syntax
    ipp_tags = {0x00200037, 0x00280030, 0x00180050, 0x00180088, 0x00281052, 0x00281053,
                0x00281054, 0x00180080, 0x00181314}
    shared_vals = {t: (vr, v) for t, vr, v in common if t in ipp_tags}
    top = [el for el in common if el[0] not in ipp_tags]
    dim_uid = uid(ident.seed, "dim", ident.study_index, plan.series_number)
    n_p, n_t = len(plan.planes), len(plan.frames)
    pixel = [(0x00280030, *shared_vals[0x00280030]), (0x00180050, *shared_vals[0x00180050])]
    if 0x00180088 in shared_vals:
        pixel.append((0x00180088, *shared_vals[0x00180088]))
    shared_item = [
        (0x00189112, "SQ", [[(0x00180080, *shared_vals[0x00180080]),
                             (0x00181314, *shared_vals[0x00181314])]]),
        (0x00189226, "SQ", [[(0x00089007, "CS", list(plan.image_type))]]),
        (0x00209116, "SQ", [[(0x00200037, *shared_vals[0x00200037])]]),
        (0x00289110, "SQ", [pixel]),
        (0x00289145, "SQ", [[(0x00281052, *shared_vals[0x00281052]),
                             (0x00281053, *shared_vals[0x00281053]),
                             (0x00281054, *shared_vals[0x00281054])]]),
    ]
    # frames in the file: phase-major or slice-major; in-stack positions base -> apex
    order = ([(p, k) for k in range(n_t) for p in range(n_p)] if plan.order == "phase_major"
             else [(p, k) for p in range(n_p) for k in range(n_t)])
    # per-frame functional groups: pydicom encodes each distinct item once (a trigger
    # time, a position, a frame content) and writes the frames' items from them
    cardiac = [encode_item([(0x00209153, "FD", float(t))]) for t in times]
    position = [encode_item([(0x00200032, "DS", list(pl.position))]) for pl in plan.planes]
    per_frame = raw_sequence(0x52009230, [
        raw_item([raw_sequence(0x00189118, [cardiac[k]]),
                  raw_sequence(0x00209111, [_frame_content(p + 1, k + 1)]),
                  raw_sequence(0x00209113, [position[p]])])
        for p, k in order])
    sop = uid(ident.seed, "sop", ident.study_index, plan.series_number, plan.repeat, 1)
    top += [
        (0x00080018, "UI", sop),
        (0x00080008, "CS", list(plan.image_type)),
        (0x0008002A, "DT", top_datetime(common)),
        (0x00200013, "IS", 1),
        (0x00209221, "SQ", [[(0x00209164, "UI", dim_uid)]]),
        (0x00209222, "SQ", [
            [(0x00209164, "UI", dim_uid), (0x00209165, "AT", 0x00209057),
             (0x00209167, "AT", 0x00209111)],
            [(0x00209164, "UI", dim_uid), (0x00209165, "AT", 0x00209128),
             (0x00209167, "AT", 0x00209111)]]),
        (0x00280008, "IS", len(order)),
        (0x00089205, "CS", "MONOCHROME"),
        (0x00089206, "CS", "VOLUME"),
        (0x00089207, "CS", "NONE"),
        (0x52009229, "SQ", [shared_item]),
    ]
    top = [el for el in {el[0]: el for el in top}.values()]  # later entries win
    assert max(el[0] for el in top) < per_frame.tag  # per-frame groups follow, in tag order
    frames = np.stack([stored[p, k] for p, k in order])
    if ts in ENCAPSULATED:
        pixels = encapsulated_pixel_element([compress_frame(f, ts, BITS_STORED) for f in frames])
    else:
        pixels = native_pixel_element(frames)
    _write_file(series_dir / "IM_0001.dcm", encode_file(
        file_meta(ENHANCED_MR_IMAGE_STORAGE, sop, ts),
        [encode_elements(top), per_frame, pixels], False))


@lru_cache(maxsize=4096)
def _frame_content(stack_position: int, temporal_position: int) -> bytes:
    """Frame Content Sequence item of a frame (the same in every series)."""
    return encode_item([
        (0x00209056, "SH", "1"), (0x00209057, "UL", stack_position),
        (0x00209128, "UL", temporal_position),
        (0x00209157, "UL", [stack_position, temporal_position])])


def top_datetime(common: list) -> str:
    """AcquisitionDateTime from the series' date and time elements."""
    values = {t: v for t, _, v in common}
    return values[0x00080022] + values[0x00080032]

