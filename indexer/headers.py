"""Reading DICOM headers (no pixels) into small picklable records.

The header pass decides everything (study, series, view, slice, frame order) before
any pixel is decoded, so non-cine series are skipped without paying for their pixels.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from dataclasses import dataclass, field
from datetime import date

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.errors import InvalidDicomError

from indexer.discover import FileRef, open_bytes

__all__ = ["FrameGeom", "FileHeader", "Rejection", "read_header", "read_dataset", "header_from_dataset", "patient_key"]

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


def patient_key(patient_id: str, salt: bytes) -> str:
    """Salted HMAC-SHA256 of the PatientID: stable per archive, not reversible without the salt."""
    return hmac.new(salt, patient_id.strip().encode(), hashlib.sha256).hexdigest()[:20]


_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})


def _text(ds: Dataset, keyword: str) -> str:
    """An element's value as text, without pydicom's per-element conversion.

    The header pass touches ~25 elements of every file and pydicom's conversion dominated
    its cost; the VRs read this way (UI, CS, DS, IS, TM, DA, AS, LO) are ASCII or Latin-1 by
    the standard, so the raw bytes are decoded directly. Multiple values stay joined by '\\'.
    """
    tag = tag_for_keyword(keyword)
    elem = ds.get_item(tag) if tag is not None and tag in ds else None
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        if elem.VR in _TEXT_VRS:
            return value.decode("latin-1").strip(" \x00")
        value = ds[tag].value  # binary (FD, UL, US...) or implicit VR: let pydicom convert it
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _text_floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    text = _text(ds, keyword)
    return _floats(text.split("\\"), n) if text else None


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _int(value, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _age_years(ds: Dataset) -> float | None:
    age = _text(ds, "PatientAge")
    if len(age) == 4 and age[:3].isdigit():
        scale = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52.18, "D": 1 / 365.25}.get(age[3].upper())
        if scale:
            return round(int(age[:3]) * scale, 2)
    birth, study = _text(ds, "PatientBirthDate"), _text(ds, "StudyDate")
    try:
        b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        s = date(int(study[:4]), int(study[4:6]), int(study[6:8]))
    except ValueError:
        return None
    return round((s - b).days / 365.25, 2)


def _philips_phase(ds: Dataset) -> int | None:
    try:
        block = ds.private_block(0x2001, PHILIPS_CREATOR)
        return _int(block[0x08].value, default=-1)
    except (KeyError, ValueError):
        return None


def _seq_item(group: Dataset | None, keyword: str) -> Dataset | None:
    if group is None:
        return None
    seq = group.get(keyword)
    return seq[0] if seq else None


def _enhanced_frames(ds: Dataset, acquisition: str) -> tuple[list[FrameGeom], tuple | None]:
    """Per-frame geometry and timing of an Enhanced MR multi-frame object."""
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_orient = _seq_item(shared, "PlaneOrientationSequence")
    shared_measures = _seq_item(shared, "PixelMeasuresSequence")
    spacing = _text_floats(shared_measures, "PixelSpacing", 2) if shared_measures else None
    frames = []
    for i, item in enumerate(per_frame):
        pos = _seq_item(item, "PlanePositionSequence")
        orient = _seq_item(item, "PlaneOrientationSequence") or shared_orient
        sync = _seq_item(item, "CardiacSynchronizationSequence")
        content = _seq_item(item, "FrameContentSequence")
        measures = _seq_item(item, "PixelMeasuresSequence")
        if spacing is None and measures is not None:
            spacing = _text_floats(measures, "PixelSpacing", 2)
        phase = None
        if content is not None and "TemporalPositionIndex" in content:
            phase = _int(_text(content, "TemporalPositionIndex"))
        frames.append(
            FrameGeom(
                file_frame=i,
                ipp=_text_floats(pos, "ImagePositionPatient", 3) if pos else None,
                iop=_text_floats(orient, "ImageOrientationPatient", 6) if orient else None,
                time_ms=_float(_text(sync, "NominalCardiacTriggerDelayTime")) if sync else None,
                phase=phase,
                order=i,
                acquisition=acquisition,
            )
        )
    return frames, spacing


def header_from_dataset(ds: Dataset, ref: FileRef, salt: bytes) -> FileHeader | Rejection:
    """Turn a parsed dataset (pixels not needed) into a FileHeader, or say why not."""
    where = str(ref)
    sop_class = _text(ds, "SOPClassUID") or str(getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return Rejection(where, "DICOMDIR index file, not an image", by_design=True)
    study_uid = _text(ds, "StudyInstanceUID")
    series_uid = _text(ds, "SeriesInstanceUID")
    if not study_uid or not series_uid:
        return Rejection(where, "no StudyInstanceUID/SeriesInstanceUID; the file cannot be placed in a study")
    modality = _text(ds, "Modality")
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    n_frames = _int(_text(ds, "NumberOfFrames"), 1) or 1
    base = dict(where=where, study_uid=study_uid, series_uid=series_uid)
    if modality and modality != "MR":
        return Rejection(reason=f"modality {modality} is not MR", by_design=True, **base)
    if rows <= 0 or columns <= 0:
        return Rejection(reason="no image (Rows/Columns absent): not an image object", by_design=True, **base)
    if not (8 <= rows <= MAX_MATRIX and 8 <= columns <= MAX_MATRIX) or n_frames > MAX_FRAMES:
        return Rejection(reason=f"absurd dimensions {rows}x{columns}x{n_frames} frames; header is corrupt", **base)

    acquisition = _text(ds, "AcquisitionTime") or _text(ds, "ContentTime")
    spacing = _text_floats(ds, "PixelSpacing", 2)
    manufacturer = _text(ds, "Manufacturer")
    if "PerFrameFunctionalGroupsSequence" in ds:
        frames, enh_spacing = _enhanced_frames(ds, acquisition)
        spacing = spacing or enh_spacing
        if len(frames) != n_frames:
            return Rejection(reason=f"{len(frames)} per-frame groups for {n_frames} frames", **base)
    else:
        trigger = _float(_text(ds, "TriggerTime"))
        # Philips exports may omit TriggerTime and number the phases in a private tag
        phase = _philips_phase(ds) if trigger is None and manufacturer.lower().startswith("philips") else None
        if phase is None and "TemporalPositionIdentifier" in ds:
            phase = _int(_text(ds, "TemporalPositionIdentifier"))
        instance = _int(_text(ds, "InstanceNumber"))
        ipp, iop = _text_floats(ds, "ImagePositionPatient", 3), _text_floats(ds, "ImageOrientationPatient", 6)
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

    sex = _text(ds, "PatientSex").upper()[:1]
    return FileHeader(
        ref=ref,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=_text(ds, "SOPInstanceUID"),
        patient_key=patient_key(_text(ds, "PatientID") or study_uid, salt),
        modality=modality,
        sop_class_uid=sop_class,
        series_number=_int(_text(ds, "SeriesNumber")),
        series_description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or ""),
        series_time=_text(ds, "SeriesTime"),
        image_type=tuple(v.strip().upper() for v in _text(ds, "ImageType").split("\\") if v.strip()),
        manufacturer=manufacturer,
        rows=rows,
        columns=columns,
        pixel_spacing=spacing,
        has_inversion_time="InversionTime" in ds,
        sex=sex if sex in ("M", "F", "O") else "",
        age=_age_years(ds),
        study_date=_text(ds, "StudyDate"),
        frames=frames,
    )


def pixel_problem(ds: Dataset, header: FileHeader) -> str:
    """What is wrong with a file's pixel data that can be seen without decoding it: absent,
    or (uncompressed) shorter than rows x columns x frames. Every frame of a series is
    checked, including the ones a clip does not decode, so a damaged series is never
    written as if it were whole."""
    if "PixelData" not in ds:
        return "missing pixel data" if "FloatPixelData" not in ds else ""
    if ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2").is_compressed:
        return ""
    bits = _int(_text(ds, "BitsAllocated"), 16)
    expected = header.rows * header.columns * len(header.frames) * bits // 8
    got = len(ds.PixelData)
    return f"truncated pixel data ({got} of {expected} bytes)" if got < expected else ""


def read_dataset(ref: FileRef, pixels: bool) -> Dataset:
    """Parse one file (with its pixel bytes, undecoded, when ``pixels``). Files without the
    128-byte preamble (old ACR-NEMA style exports) are retried leniently but only accepted
    if they carry the UIDs of an image."""
    with warnings.catch_warnings(), open_bytes(ref) as fp:
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(fp, stop_before_pixels=not pixels)
        except InvalidDicomError:
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=not pixels, force=True)
    if "SOPClassUID" not in ds or "StudyInstanceUID" not in ds:
        raise InvalidDicomError("no DICOM header")
    return ds


def read_header(ref: FileRef, salt: bytes, pixels: bool = False) -> tuple[FileHeader | Rejection, Dataset | None]:
    """Read one file; any failure becomes a Rejection. Returns the dataset too, so that a
    caller that asked for ``pixels`` can decode them without reading the file again."""
    try:
        ds = read_dataset(ref, pixels)
    except InvalidDicomError:
        return Rejection(str(ref), "not a DICOM file (no DICM preamble and no valid header)"), None
    except (OSError, EOFError) as err:
        return Rejection(str(ref), f"unreadable or truncated file: {getattr(err, 'strerror', None) or err}"), None
    except Exception as err:  # pydicom raises many types on corrupt headers
        return Rejection(str(ref), f"corrupt DICOM header: {type(err).__name__}: {err}"), None
    try:
        with warnings.catch_warnings():  # vendor quirks warn per element; the report is what counts
            warnings.simplefilter("ignore")
            header = header_from_dataset(ds, ref, salt)
            if pixels and isinstance(header, FileHeader):
                header.pixel_problem = pixel_problem(ds, header)
            return header, ds
    except Exception as err:
        return Rejection(str(ref), f"unusable DICOM header: {type(err).__name__}: {err}"), None
