"""Reading DICOM headers (no pixels) into small picklable records.

The header pass decides everything (study, series, view, slice, frame order) before
any pixel is decoded, so non-cine series are skipped without paying for their pixels.
Values come from ``reader`` (plain values of the raw elements); this module says what
they mean: a ``FileHeader`` with every frame's geometry and timing, or a ``Rejection``
with its reason. The PatientID becomes a ``patient_key`` here; no raw ID leaves it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import date

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from cmr_search.ingest.discover import FileRef
from cmr_search.ingest.reader import (
    Elements,
    as_float,
    as_int,
    elements,
    free_text,
    has,
    read_dataset,
    seq_item,
    tag_of,
    text,
    text_floats,
    transfer_syntax,
)
from cmr_search.store.patients import patient_key

__all__ = ["FileHeader", "FrameGeom", "Rejection", "header_from_dataset", "pixel_problem", "read_header"]

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
MAX_MATRIX = 2048  # larger cine matrices do not exist; such headers are corrupt
MAX_FRAMES = 10_000
PHILIPS_CREATOR = "Philips Imaging DD 001"


@dataclass(frozen=True)
class FrameGeom:
    """Where and when one frame was acquired."""

    file_frame: int  # index of the frame inside its file (0 for classic single-frame MR)
    ipp: tuple[float, float, float] | None  # ImagePositionPatient, mm
    iop: tuple[float, ...] | None  # ImageOrientationPatient (row dir, column dir)
    time_ms: float | None  # TriggerTime or NominalCardiacTriggerDelayTime
    phase: int | None  # Philips phase number, TemporalPositionIndex or -Identifier
    order: int  # InstanceNumber-based fallback order
    acquisition: str  # AcquisitionTime/ContentTime: tells repeated acquisitions apart


@dataclass
class FileHeader:
    """The header fields of one DICOM file that ingestion needs (no PHI)."""

    ref: FileRef
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_key: str
    modality: str
    sop_class_uid: str
    series_number: int
    series_description: str
    series_time: str
    image_type: tuple[str, ...]
    manufacturer: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    has_inversion_time: bool
    sex: str
    age: float | None
    study_date: str
    frames: list[FrameGeom] = field(default_factory=list)
    pixel_problem: str = ""  # set when the file was read with pixels and they are absent or short


@dataclass(frozen=True)
class Rejection:
    """A file or series that could not be used, with the reason in words."""

    where: str
    reason: str
    study_uid: str = ""
    series_uid: str = ""
    by_design: bool = False  # skipped on purpose (localizer, LGE, ...), not an error


def _age_years(elems: Elements) -> float | None:
    age = text(elems, "PatientAge")
    if len(age) == 4 and age[:3].isdigit():
        scale = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52.18, "D": 1 / 365.25}.get(age[3].upper())
        if scale:
            return round(int(age[:3]) * scale, 2)
    birth, study = text(elems, "PatientBirthDate"), text(elems, "StudyDate")
    try:
        b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        s = date(int(study[:4]), int(study[4:6]), int(study[6:8]))
    except ValueError:
        return None
    return round((s - b).days / 365.25, 2)


def _philips_phase(ds: Dataset) -> int | None:
    try:
        block = ds.private_block(0x2001, PHILIPS_CREATOR)
        return as_int(block[0x08].value, default=-1)
    except (KeyError, ValueError):
        return None


def _enhanced_frames(ds: Dataset, acquisition: str) -> tuple[list[FrameGeom], tuple | None]:
    """Per-frame geometry and timing of an Enhanced MR multi-frame object."""
    shared = seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_orient = seq_item(shared, "PlaneOrientationSequence")
    shared_measures = seq_item(shared, "PixelMeasuresSequence")
    spacing = text_floats(elements(shared_measures), "PixelSpacing", 2) if shared_measures else None
    frames = []
    for i, item in enumerate(per_frame):
        pos = seq_item(item, "PlanePositionSequence")
        orient = seq_item(item, "PlaneOrientationSequence") or shared_orient
        sync = seq_item(item, "CardiacSynchronizationSequence")
        content = elements(seq_item(item, "FrameContentSequence") or Dataset())
        measures = seq_item(item, "PixelMeasuresSequence")
        if spacing is None and measures is not None:
            spacing = text_floats(elements(measures), "PixelSpacing", 2)
        frames.append(
            FrameGeom(
                file_frame=i,
                ipp=text_floats(elements(pos), "ImagePositionPatient", 3) if pos else None,
                iop=text_floats(elements(orient), "ImageOrientationPatient", 6) if orient else None,
                time_ms=as_float(text(elements(sync), "NominalCardiacTriggerDelayTime")) if sync else None,
                phase=as_int(text(content, "TemporalPositionIndex")) if has(content, "TemporalPositionIndex") else None,
                order=i,
                acquisition=acquisition,
            )
        )
    return frames, spacing


def header_from_dataset(ds: Dataset, ref: FileRef, salt: bytes, elems: Elements | None = None) -> FileHeader | Rejection:
    """Turn a parsed dataset (pixels not needed) into a FileHeader, or say why not
    (``elems``: the dataset's ``elements``, when the caller has them already)."""
    where = str(ref)
    elems = elements(ds) if elems is None else elems
    sop_class = text(elems, "SOPClassUID") or str(getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return Rejection(where, "DICOMDIR index file, not an image", by_design=True)
    study_uid = text(elems, "StudyInstanceUID")
    series_uid = text(elems, "SeriesInstanceUID")
    if not study_uid or not series_uid:
        return Rejection(where, "no StudyInstanceUID/SeriesInstanceUID; the file cannot be placed in a study")
    modality = text(elems, "Modality")
    rows, columns = as_int(text(elems, "Rows")), as_int(text(elems, "Columns"))
    n_frames = as_int(text(elems, "NumberOfFrames"), 1) or 1
    base = {"where": where, "study_uid": study_uid, "series_uid": series_uid}
    if modality and modality != "MR":
        return Rejection(reason=f"modality {modality} is not MR", by_design=True, **base)
    if not has(elems, "Rows") or not has(elems, "Columns"):
        return Rejection(reason="no image (Rows/Columns absent): not an image object", by_design=True, **base)
    if rows <= 0 or columns <= 0:
        return Rejection(reason=f"an image of {rows}x{columns} pixels; the header is corrupt", **base)
    if not (8 <= rows <= MAX_MATRIX and 8 <= columns <= MAX_MATRIX) or n_frames > MAX_FRAMES:
        return Rejection(reason=f"absurd dimensions {rows}x{columns}x{n_frames} frames; header is corrupt", **base)

    acquisition = text(elems, "AcquisitionTime") or text(elems, "ContentTime")
    spacing = text_floats(elems, "PixelSpacing", 2)
    manufacturer = text(elems, "Manufacturer")
    if has(elems, "PerFrameFunctionalGroupsSequence"):
        frames, enh_spacing = _enhanced_frames(ds, acquisition)
        spacing = spacing or enh_spacing
        if len(frames) != n_frames:
            return Rejection(reason=f"{len(frames)} per-frame groups for {n_frames} frames", **base)
    else:
        trigger = as_float(text(elems, "TriggerTime"))
        # Philips exports may omit TriggerTime and number the phases in a private tag
        phase = _philips_phase(ds) if trigger is None and manufacturer.lower().startswith("philips") else None
        if phase is None and has(elems, "TemporalPositionIdentifier"):
            phase = as_int(text(elems, "TemporalPositionIdentifier"))
        instance = as_int(text(elems, "InstanceNumber"))
        ipp, iop = text_floats(elems, "ImagePositionPatient", 3), text_floats(elems, "ImageOrientationPatient", 6)
        frames = [
            FrameGeom(
                file_frame=i,
                ipp=ipp,
                iop=iop,
                time_ms=trigger,
                phase=phase,
                order=instance * MAX_FRAMES + i,
                acquisition=acquisition,
            )
            for i in range(n_frames)
        ]
    if spacing is not None and not all(0.05 <= s <= 20 for s in spacing):
        return Rejection(reason=f"absurd pixel spacing {spacing} mm", **base)

    sex = text(elems, "PatientSex").upper()[:1]
    return FileHeader(
        ref=ref,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=text(elems, "SOPInstanceUID"),
        patient_key=patient_key(text(elems, "PatientID") or study_uid, salt),
        modality=modality,
        sop_class_uid=sop_class,
        series_number=as_int(text(elems, "SeriesNumber")),
        # free text in the study's character set: pydicom decodes it
        series_description=free_text(ds, elems, "SeriesDescription") or free_text(ds, elems, "ProtocolName"),
        series_time=text(elems, "SeriesTime"),
        image_type=tuple(v.strip().upper() for v in text(elems, "ImageType").split("\\") if v.strip()),
        manufacturer=manufacturer,
        rows=rows,
        columns=columns,
        pixel_spacing=spacing,
        has_inversion_time=has(elems, "InversionTime"),
        sex=sex if sex in ("M", "F", "O") else "",
        age=_age_years(elems),
        study_date=text(elems, "StudyDate"),
        frames=frames,
    )


def pixel_problem(ds: Dataset, elems: Elements, header: FileHeader) -> str:
    """What is wrong with a file's pixel data that can be seen without decoding it: absent,
    or (uncompressed) shorter than rows x columns x frames. Every frame of a series is
    checked, including the ones a clip does not decode, so a damaged series is never
    written as if it were whole."""
    if not has(elems, "PixelData"):
        return "missing pixel data" if not has(elems, "FloatPixelData") else ""
    if (transfer_syntax(ds) or UID("1.2.840.10008.1.2")).is_compressed:
        return ""
    bits = as_int(text(elems, "BitsAllocated"), 16)
    expected = header.rows * header.columns * len(header.frames) * bits // 8
    got = len(elems[tag_of("PixelData")].value or b"")
    return f"truncated pixel data ({got} of {expected} bytes)" if got < expected else ""


def read_header(ref: FileRef, salt: bytes, pixels: bool = False) -> tuple[FileHeader | Rejection, Dataset | None]:
    """Read one file; any failure becomes a Rejection. Returns the dataset too, so that a
    caller that asked for ``pixels`` can decode them without reading the file again."""
    try:
        ds = read_dataset(ref, pixels)
    except InvalidDicomError:
        return Rejection(str(ref), "not a DICOM file (no DICM preamble and no valid header)"), None
    except (OSError, EOFError) as err:
        return Rejection(str(ref), f"unreadable or truncated file: {getattr(err, 'strerror', None) or err}"), None
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        return Rejection(str(ref), f"corrupt DICOM header: {type(err).__name__}: {err}"), None
    try:
        with warnings.catch_warnings():  # vendor quirks warn per element; the report is what counts
            warnings.simplefilter("ignore")
            elems = elements(ds)
            header = header_from_dataset(ds, ref, salt, elems)
            if pixels and isinstance(header, FileHeader):
                header.pixel_problem = pixel_problem(ds, elems, header)
            return header, ds
    except Exception as err:  # noqa: BLE001 - any failure of one file becomes its Rejection
        return Rejection(str(ref), f"unusable DICOM header: {type(err).__name__}: {err}"), None
