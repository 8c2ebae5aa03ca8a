"""A small reader interface over raw DICOM elements: one read of a DICOM file -> plain
values (text, numbers, tuples) keyed by int tags.

This is the only place that touches pydicom's parser (``read_dataset``) and its decoder
options (``decode_options``). Values are read from the raw element bytes: text VRs decoded
directly, binary numbers unpacked with the file's byte order, anything else converted by
pydicom; ``tests/ingest/test_reader.py`` holds both to pydicom's own answers on every
pydicom and pydicom-data test file. What the values mean (a study, a frame's geometry, a
rejection) is ``headers.py``'s business.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Mapping
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
    "as_float",
    "as_int",
    "decode_options",
    "elements",
    "free_text",
    "has",
    "read_dataset",
    "rescale",
    "seq_item",
    "tag_of",
    "text",
    "text_floats",
    "transfer_syntax",
]

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})
_BINARY_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}

Elements = Mapping[int, "DataElement | RawDataElement"]


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
            if not _starts_like_a_dataset(fp.read(4)):
                # a lenient parse walks any bytes as elements: 1-2 s per MiB of zeros or noise
                raise InvalidDicomError("no DICM preamble, and the first bytes are not a DICOM element") from None
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=not pixels, force=True)
    if "SOPClassUID" not in ds or "StudyInstanceUID" not in ds:
        raise InvalidDicomError("no DICOM header")
    return ds


def _starts_like_a_dataset(head: bytes) -> bool:
    """Whether a file without the preamble begins with an element of the file meta (0002) or
    identifying (0008) group, in either byte order, as preamble-less exports do."""
    if len(head) < 4:
        return False
    return int.from_bytes(head[:2], "little") in (0x0002, 0x0008) or int.from_bytes(head[:2], "big") in (0x0002, 0x0008)


def elements(ds: Dataset) -> Elements:
    """A dataset's top-level elements keyed by plain int tags, left raw where pydicom has
    not converted them yet.

    Every lookup by pydicom's own ``BaseTag`` keys runs a Python-level ``__eq__``, and
    reading an element converts it; the header pass reads ~25 elements of every file, and
    both costs dominated it (measured: docs/BENCHMARKS.md, ingestion).
    """
    return {int(tag): elem for tag, elem in ds.items()}


@cache
def tag_of(keyword: str) -> int:
    """The int tag of a DICOM keyword (KeyError for a word that is not one)."""
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


def has(elems: Elements, keyword: str) -> bool:
    """Whether the element is present (whatever its value)."""
    return tag_of(keyword) in elems


def text(elems: Elements, keyword: str) -> str:
    """An element's value as text, without pydicom's per-element conversion.

    The text VRs read this way (UI, CS, DS, IS, TM, DA, AS, LO) are ASCII or Latin-1 by
    the standard, so their raw bytes are decoded directly, and the binary numbers (US, FD,
    ...) are unpacked with the file's byte order; anything else goes through pydicom.
    Multiple values stay joined by '\\'.
    """
    tag = tag_of(keyword)
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


def free_text(ds: Dataset, elems: Elements, keyword: str) -> str:
    """A free-text element (LO, SH): plain ASCII directly, anything else decoded by pydicom
    in the file's character set."""
    elem = elems.get(tag_of(keyword))
    value = None if elem is None else elem.value
    if isinstance(value, bytes) and value.isascii() and b"\x1b" not in value:  # ESC: ISO 2022 code switching
        return value.decode("ascii").strip(" \x00")
    return str(ds.get(keyword, "") or "") if elem is not None else ""


def text_floats(elems: Elements, keyword: str, n: int) -> tuple[float, ...] | None:
    """A multi-valued number element as ``n`` floats; None when absent or not ``n`` numbers."""
    value = text(elems, keyword)
    return _floats(value.split("\\"), n) if value else None


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def as_int(value, default: int = 0) -> int:
    """``int(value)``, or ``default`` when it is not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def as_float(value) -> float | None:
    """``float(value)``, or None when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def seq_item(group: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of a sequence element of ``group``; None when either is absent."""
    if group is None:
        return None
    seq = group.get(keyword)
    return seq[0] if seq else None


def transfer_syntax(ds: Dataset) -> UID | None:
    """The file's transfer syntax, None when it has no file meta information."""
    meta = getattr(ds, "file_meta", None)
    value = text(elements(meta), "TransferSyntaxUID") if meta is not None else ""
    return UID(value) if value else None


def rescale(ds: Dataset, elems: Elements, frame: int) -> tuple[float, float]:
    """Rescale slope and intercept of one frame, classic or Enhanced MR (``elems``: the
    dataset's ``elements``)."""
    if not has(elems, "PerFrameFunctionalGroupsSequence"):
        return as_float(text(elems, "RescaleSlope")) or 1.0, as_float(text(elems, "RescaleIntercept")) or 0.0
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[frame] if len(groups) > frame else groups[0]
        pvt = seq_item(item, "PixelValueTransformationSequence")
        if pvt is not None:
            pvt_elems = elements(pvt)
            return as_float(text(pvt_elems, "RescaleSlope")) or 1.0, as_float(text(pvt_elems, "RescaleIntercept")) or 0.0
    return 1.0, 0.0


def decode_options(ds: Dataset, elems: Elements) -> dict | None:
    """Keyword arguments for pydicom's ``Decoder.as_array`` on the dataset's PixelData
    buffer, read from the raw elements; None when anything needed is absent (let
    ``ds.pixel_array`` decode and explain). Handing pydicom the buffer with these options
    skips its per-call dataset lookups, which cost more than decoding a cine frame."""
    pixel = elems.get(tag_of("PixelData"))
    syntax = transfer_syntax(ds)
    keys = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation")
    values = [text(elems, k) for k in keys]
    # retired big-endian syntaxes swap bytes by the pixel VR: rare enough to leave to pydicom
    if pixel is None or pixel.value is None or syntax is None or not syntax.is_little_endian or not all(values):
        return None
    rows, columns, samples, allocated, stored, representation, photometric = values
    options = {
        "rows": as_int(rows), "columns": as_int(columns), "samples_per_pixel": as_int(samples), "bits_allocated": as_int(allocated),
        "bits_stored": as_int(stored), "pixel_representation": as_int(representation), "photometric_interpretation": photometric,
        "number_of_frames": as_int(text(elems, "NumberOfFrames"), 1) or 1, "transfer_syntax_uid": syntax, "pixel_keyword": "PixelData",
    }
    if options["samples_per_pixel"] > 1:
        options["planar_configuration"] = as_int(text(elems, "PlanarConfiguration"))
    return options
