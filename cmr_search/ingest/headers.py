"""Reading DICOM headers (no pixels) into small picklable records.

The header pass decides everything (study, series, view, slice, frame order) before
any pixel is decoded, so non-cine series are skipped without paying for their pixels.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from functools import cache

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from cmr_search.ingest.discover import FileRef, open_bytes

__all__ = [
    "Elements",
    "FileHeader",
    "FrameGeom",
    "Rejection",
    "decode_options",
    "elements",
    "header_from_dataset",
    "patient_key",
    "read_dataset",
    "read_header",
    "rescale",
    "transfer_syntax",
]

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
_BINARY_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}

Elements = Mapping[int, "DataElement | RawDataElement"]


def elements(ds: Dataset) -> Elements:
    """A dataset's top-level elements keyed by plain int tags, left raw where pydicom has
    not converted them yet.

    Every lookup by pydicom's own ``BaseTag`` keys runs a Python-level ``__eq__``, and
    reading an element converts it; the header pass reads ~25 elements of every file, and
    both costs dominated it (measured: docs/BENCHMARKS.md, ingestion).
    """
    return {int(tag): elem for tag, elem in ds.items()}


@cache
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword} is not a DICOM keyword")
    return tag


@cache
def _standard_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:  # private or unknown: not read as text
        return "UN"


def _has(elems: Elements, keyword: str) -> bool:
    return _tag(keyword) in elems


def _text(elems: Elements, keyword: str) -> str:
    """An element's value as text, without pydicom's per-element conversion.

    The text VRs read this way (UI, CS, DS, IS, TM, DA, AS, LO) are ASCII or Latin-1 by
    the standard, so their raw bytes are decoded directly, and the binary numbers (US, FD,
    ...) are unpacked with the file's byte order; anything else goes through pydicom.
    Multiple values stay joined by '\\'.
    """
    tag = _tag(keyword)
    elem = elems.get(tag)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, bytes) and isinstance(elem, RawDataElement):
        vr = elem.VR or _standard_vr(tag)  # implicit VR files leave the VR to the dictionary
        if vr in _TEXT_VRS:
            return value.decode("latin-1").strip(" \x00")
        code = _BINARY_VRS.get(vr)
        if code and len(value) % struct.calcsize(code) == 0:
            order = "<" if elem.is_little_endian else ">"
            value = struct.unpack(f"{order}{len(value) // struct.calcsize(code)}{code}", value)
        else:
            value = convert_raw_data_element(elem).value
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _free_text(ds: Dataset, elems: Elements, keyword: str) -> str:
    """A free-text element (LO, SH): plain ASCII directly, anything else decoded by pydicom
    in the file's character set."""
    elem = elems.get(_tag(keyword))
    value = None if elem is None else elem.value
    if isinstance(value, bytes) and value.isascii() and b"\x1b" not in value:  # ESC: ISO 2022 code switching
        return value.decode("ascii").strip(" \x00")
    return str(ds.get(keyword, "") or "") if elem is not None else ""


def transfer_syntax(ds: Dataset) -> UID | None:
    """The file's transfer syntax, None when it has no file meta information."""
    meta = getattr(ds, "file_meta", None)
    text = _text(elements(meta), "TransferSyntaxUID") if meta is not None else ""
    return UID(text) if text else None


def rescale(ds: Dataset, elems: Elements, frame: int) -> tuple[float, float]:
    """Rescale slope and intercept of one frame, classic or Enhanced MR (``elems``: the
    dataset's ``elements``)."""
    if not _has(elems, "PerFrameFunctionalGroupsSequence"):
        return _float(_text(elems, "RescaleSlope")) or 1.0, _float(_text(elems, "RescaleIntercept")) or 0.0
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[frame] if len(groups) > frame else groups[0]
        pvt = _seq_item(item, "PixelValueTransformationSequence")
        if pvt is not None:
            pvt_elems = elements(pvt)
            return _float(_text(pvt_elems, "RescaleSlope")) or 1.0, _float(_text(pvt_elems, "RescaleIntercept")) or 0.0
    return 1.0, 0.0


def _text_floats(elems: Elements, keyword: str, n: int) -> tuple[float, ...] | None:
    text = _text(elems, keyword)
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


def _age_years(elems: Elements) -> float | None:
    age = _text(elems, "PatientAge")
    if len(age) == 4 and age[:3].isdigit():
        scale = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52.18, "D": 1 / 365.25}.get(age[3].upper())
        if scale:
            return round(int(age[:3]) * scale, 2)
    birth, study = _text(elems, "PatientBirthDate"), _text(elems, "StudyDate")
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
    spacing = _text_floats(elements(shared_measures), "PixelSpacing", 2) if shared_measures else None
    frames = []
    for i, item in enumerate(per_frame):
        pos = _seq_item(item, "PlanePositionSequence")
        orient = _seq_item(item, "PlaneOrientationSequence") or shared_orient
        sync = _seq_item(item, "CardiacSynchronizationSequence")
        content = elements(_seq_item(item, "FrameContentSequence") or Dataset())
        measures = _seq_item(item, "PixelMeasuresSequence")
        if spacing is None and measures is not None:
            spacing = _text_floats(elements(measures), "PixelSpacing", 2)
        frames.append(
            FrameGeom(
                file_frame=i,
                ipp=_text_floats(elements(pos), "ImagePositionPatient", 3) if pos else None,
                iop=_text_floats(elements(orient), "ImageOrientationPatient", 6) if orient else None,
                time_ms=_float(_text(elements(sync), "NominalCardiacTriggerDelayTime")) if sync else None,
                phase=_int(_text(content, "TemporalPositionIndex")) if _has(content, "TemporalPositionIndex") else None,
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
    sop_class = _text(elems, "SOPClassUID") or str(getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return Rejection(where, "DICOMDIR index file, not an image", by_design=True)
    study_uid = _text(elems, "StudyInstanceUID")
    series_uid = _text(elems, "SeriesInstanceUID")
    if not study_uid or not series_uid:
        return Rejection(where, "no StudyInstanceUID/SeriesInstanceUID; the file cannot be placed in a study")
    modality = _text(elems, "Modality")
    rows, columns = _int(_text(elems, "Rows")), _int(_text(elems, "Columns"))
    n_frames = _int(_text(elems, "NumberOfFrames"), 1) or 1
    base = {"where": where, "study_uid": study_uid, "series_uid": series_uid}
    if modality and modality != "MR":
        return Rejection(reason=f"modality {modality} is not MR", by_design=True, **base)
    if rows <= 0 or columns <= 0:
        return Rejection(reason="no image (Rows/Columns absent): not an image object", by_design=True, **base)
    if not (8 <= rows <= MAX_MATRIX and 8 <= columns <= MAX_MATRIX) or n_frames > MAX_FRAMES:
        return Rejection(reason=f"absurd dimensions {rows}x{columns}x{n_frames} frames; header is corrupt", **base)

    acquisition = _text(elems, "AcquisitionTime") or _text(elems, "ContentTime")
    spacing = _text_floats(elems, "PixelSpacing", 2)
    manufacturer = _text(elems, "Manufacturer")
    if _has(elems, "PerFrameFunctionalGroupsSequence"):
        frames, enh_spacing = _enhanced_frames(ds, acquisition)
        spacing = spacing or enh_spacing
        if len(frames) != n_frames:
            return Rejection(reason=f"{len(frames)} per-frame groups for {n_frames} frames", **base)
    else:
        trigger = _float(_text(elems, "TriggerTime"))
        # Philips exports may omit TriggerTime and number the phases in a private tag
        phase = _philips_phase(ds) if trigger is None and manufacturer.lower().startswith("philips") else None
        if phase is None and _has(elems, "TemporalPositionIdentifier"):
            phase = _int(_text(elems, "TemporalPositionIdentifier"))
        instance = _int(_text(elems, "InstanceNumber"))
        ipp, iop = _text_floats(elems, "ImagePositionPatient", 3), _text_floats(elems, "ImageOrientationPatient", 6)
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

    sex = _text(elems, "PatientSex").upper()[:1]
    return FileHeader(
        ref=ref,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=_text(elems, "SOPInstanceUID"),
        patient_key=patient_key(_text(elems, "PatientID") or study_uid, salt),
        modality=modality,
        sop_class_uid=sop_class,
        series_number=_int(_text(elems, "SeriesNumber")),
        # free text in the study's character set: pydicom decodes it
        series_description=_free_text(ds, elems, "SeriesDescription") or _free_text(ds, elems, "ProtocolName"),
        series_time=_text(elems, "SeriesTime"),
        image_type=tuple(v.strip().upper() for v in _text(elems, "ImageType").split("\\") if v.strip()),
        manufacturer=manufacturer,
        rows=rows,
        columns=columns,
        pixel_spacing=spacing,
        has_inversion_time=_has(elems, "InversionTime"),
        sex=sex if sex in ("M", "F", "O") else "",
        age=_age_years(elems),
        study_date=_text(elems, "StudyDate"),
        frames=frames,
    )


def pixel_problem(ds: Dataset, elems: Elements, header: FileHeader) -> str:
    """What is wrong with a file's pixel data that can be seen without decoding it: absent,
    or (uncompressed) shorter than rows x columns x frames. Every frame of a series is
    checked, including the ones a clip does not decode, so a damaged series is never
    written as if it were whole."""
    if not _has(elems, "PixelData"):
        return "missing pixel data" if not _has(elems, "FloatPixelData") else ""
    if (transfer_syntax(ds) or UID("1.2.840.10008.1.2")).is_compressed:
        return ""
    bits = _int(_text(elems, "BitsAllocated"), 16)
    expected = header.rows * header.columns * len(header.frames) * bits // 8
    got = len(elems[_tag("PixelData")].value or b"")
    return f"truncated pixel data ({got} of {expected} bytes)" if got < expected else ""


def decode_options(ds: Dataset, elems: Elements) -> dict | None:
    """Keyword arguments for pydicom's ``Decoder.as_array`` on the dataset's PixelData
    buffer, read from the raw elements; None when anything needed is absent (let
    ``ds.pixel_array`` decode and explain). Handing pydicom the buffer with these options
    skips its per-call dataset lookups, which cost more than decoding a cine frame."""
    pixel = elems.get(_tag("PixelData"))
    syntax = transfer_syntax(ds)
    keys = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation")
    values = [_text(elems, k) for k in keys]
    # retired big-endian syntaxes swap bytes by the pixel VR: rare enough to leave to pydicom
    if pixel is None or pixel.value is None or syntax is None or not syntax.is_little_endian or not all(values):
        return None
    rows, columns, samples, allocated, stored, representation, photometric = values
    options = {
        "rows": _int(rows), "columns": _int(columns), "samples_per_pixel": _int(samples), "bits_allocated": _int(allocated),
        "bits_stored": _int(stored), "pixel_representation": _int(representation), "photometric_interpretation": photometric,
        "number_of_frames": _int(_text(elems, "NumberOfFrames"), 1) or 1, "transfer_syntax_uid": syntax, "pixel_keyword": "PixelData",
    }
    if options["samples_per_pixel"] > 1:
        options["planar_configuration"] = _int(_text(elems, "PlanarConfiguration"))
    return options


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
