"""DICOM Part 10 encoding for the generator, done by pydicom in cached pieces.

Writing every file with ``pydicom.dcmwrite`` costs ~1 ms of file meta plus
~0.1 ms per element (value checks, charset handling, sorting); a cohort has
~70,000 files with ~65 elements each. So the generator asks pydicom
(``pydicom.filewriter.write_data_element`` / ``write_dataset`` /
``write_file_meta_info``) to encode a series' shared elements once, and per
file only the handful that change (UIDs, instance number, trigger time,
position, pixel data); the encoded elements are concatenated in tag order,
which is what ``write_dataset`` itself does. Compressed frames come from
pydicom's pixel encoders (pylibjpeg plugins) and are encapsulated by
``pydicom.encaps.encapsulate``. Every file is read back with pydicom in the tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    write_data_element,
    write_dataset,
    write_file_meta_info,
    write_sequence_item,
)
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.valuerep import format_number_as_ds

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
ENCAPSULATED = {RLE_LOSSLESS, JPEG2000_LOSSLESS}
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1404.1"  # fixed, for reproducible files
IMPLEMENTATION_VERSION = "CMRSYNTH_01"
PREAMBLE = b"\0" * 128 + b"DICM"  # what dcmwrite writes before the file meta group

# an element is (tag, VR, value); a sequence value is a list of items (lists of elements)
Element = tuple[int, str, object]

_NUMBERS = {"US": int, "UL": int, "SS": int, "SL": int, "FL": float, "FD": float}


def format_ds(x: float) -> str:
    """Decimal String of at most 16 characters, as precise as fits (pydicom's formatter)."""
    return format_number_as_ds(float(x))


def _ds(value) -> str:
    return value if isinstance(value, str) else format_ds(value)


def _value(vr: str, value):
    """A Python value pydicom accepts for `vr` (numpy scalars, DS floats formatted)."""
    if vr == "SQ":
        return DicomSequence([dataset(item) for item in value])
    many = isinstance(value, (list, tuple, np.ndarray))
    if vr == "DS":
        return [_ds(v) for v in value] if many else _ds(value)
    if vr in _NUMBERS:
        cast = _NUMBERS[vr]
        return [cast(v) for v in value] if many else cast(value)
    if vr == "AT":
        return [int(v) for v in value] if many else int(value)
    if vr == "IS":
        return [str(int(v)) for v in value] if many else str(value)
    return list(value) if many else value


def data_element(tag: int, vr: str, value) -> DataElement:
    """A pydicom DataElement (sequences as pydicom Sequences of Datasets)."""
    return DataElement(tag, vr, _value(vr, value))


def dataset(elements: Iterable[Element]) -> Dataset:
    """A pydicom Dataset of the elements."""
    ds = Dataset()
    for tag, vr, value in elements:
        ds.add(data_element(tag, vr, value))
    return ds


def _buffer(implicit: bool) -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    return fp


def write_element(elem: DataElement | RawDataElement, implicit: bool = False) -> bytes:
    """One pydicom (Raw)DataElement, little endian, encoded by pydicom."""
    fp = _buffer(implicit)
    write_data_element(fp, elem)
    return fp.getvalue()


def encode_element(tag: int, vr: str, value, implicit: bool = False) -> bytes:
    """One data element, little endian, explicit or implicit VR, encoded by pydicom."""
    return write_element(data_element(tag, vr, value), implicit)


@lru_cache(maxsize=1 << 16, typed=True)
def encode_cached(tag: int, vr: str, value, implicit: bool = False) -> bytes:
    """encode_element for hashable values that recur (study-level elements, numbers)."""
    return encode_element(tag, vr, value, implicit)


def _hashable(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_hashable(v) for v in value)
    return value


def encode_elements(elements: Iterable[Element], implicit: bool = False) -> bytes:
    """Elements in ascending tag order, as a dataset body (pydicom's write_dataset)."""
    fp = _buffer(implicit)
    write_dataset(fp, dataset(elements))
    return fp.getvalue()


def encoded_parts(elements: Iterable[Element], implicit: bool) -> dict[int, bytes]:
    """Each element encoded on its own, keyed by tag (for per-file merging in tag order)."""
    return {t: encode_cached(t, vr, _hashable(v), implicit) if vr != "SQ"
            else encode_element(t, vr, v, implicit) for t, vr, v in elements}


def encode_item(elements: Iterable[Element], implicit: bool = False) -> bytes:
    """One sequence item (Item tag, length, dataset), pydicom's write_sequence_item."""
    fp = _buffer(implicit)
    write_sequence_item(fp, dataset(elements), [default_encoding])
    return fp.getvalue()


def raw_sequence(tag: int, items: Iterable[bytes], implicit: bool = False) -> RawDataElement:
    """A sequence element whose items are already encoded (by encode_item / raw_item).

    pydicom writes a RawDataElement's value as it is, with its own tag, VR and length.
    """
    value = b"".join(items)
    return RawDataElement(BaseTag(tag), "SQ", len(value), value, 0, implicit, True)


def raw_item(elements: Iterable[RawDataElement], implicit: bool = False) -> bytes:
    """One sequence item of already encoded sequence elements (pydicom writes it).

    The item's original encoding is set to the one written, so that pydicom writes
    the raw elements without decoding them.
    """
    ds = Dataset()
    for elem in elements:
        ds[elem.tag] = elem
    ds.set_original_encoding(implicit, True, default_encoding)
    fp = _buffer(implicit)
    write_sequence_item(fp, ds, [default_encoding])
    return fp.getvalue()


def _file_meta_dataset(sop_class: str, sop_instance: str,
                       transfer_syntax: str) -> FileMetaDataset:
    fm = FileMetaDataset()
    fm.FileMetaInformationVersion = b"\x00\x01"
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_instance
    fm.TransferSyntaxUID = transfer_syntax
    fm.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    fm.ImplementationVersionName = IMPLEMENTATION_VERSION
    return fm


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """128-byte preamble, 'DICM' and the File Meta Information group (write_file_meta_info)."""
    fp = _buffer(False)
    fp.write(PREAMBLE)
    write_file_meta_info(fp, _file_meta_dataset(sop_class, sop_instance, transfer_syntax))
    return fp.getvalue()


@lru_cache(maxsize=64)
def meta_template(sop_class: str, transfer_syntax: str) -> tuple[bytes, bytes]:
    """The meta elements before and after (0002,0003), which differs per file.

    Encoded by pydicom once per (SOP class, transfer syntax) from the same
    FileMetaDataset that file_meta writes; file_meta_from adds the per-file elements.
    """
    fm = _file_meta_dataset(sop_class, "", transfer_syntax)
    before, after = Dataset(), Dataset()
    for elem in fm:
        if elem.tag < 0x00020003:
            before.add(elem)
        elif elem.tag > 0x00020003:
            after.add(elem)
    parts = []
    for ds in (before, after):
        fp = _buffer(False)
        write_dataset(fp, ds)
        parts.append(fp.getvalue())
    return parts[0], parts[1]


def file_meta_from(before: bytes, after: bytes, sop_instance: str) -> bytes:
    """File meta from a template and the file's SOP Instance UID.

    Byte-identical to file_meta(): (0002,0000) holds the group's length after it.
    """
    instance = encode_element(0x00020003, "UI", sop_instance)
    length = encode_cached(0x00020000, "UL", len(before) + len(instance) + len(after))
    return b"".join((PREAMBLE, length, before, instance, after))


def native_pixel_element(pixels: np.ndarray) -> DataElement:
    """(7FE0,0010) OW with uncompressed little-endian 16-bit pixels."""
    return DataElement(0x7FE00010, "OW", np.ascontiguousarray(pixels, dtype="<u2").tobytes())


def native_pixel_data(pixels: np.ndarray, implicit: bool) -> bytes:
    """native_pixel_element, encoded by pydicom."""
    return write_element(native_pixel_element(pixels), implicit)


def encapsulated_pixel_element(frames: Sequence[bytes]) -> DataElement:
    """(7FE0,0010) OB, undefined length: pydicom's encapsulation, one fragment per frame.

    The Basic Offset Table is filled for multi-frame data and left empty for one frame.
    """
    value = encapsulate(list(frames), has_bot=len(frames) > 1)
    return DataElement(0x7FE00010, "OB", value, is_undefined_length=True)


def encapsulated_pixel_data(frames: Sequence[bytes]) -> bytes:
    """encapsulated_pixel_element, encoded by pydicom."""
    return write_element(encapsulated_pixel_element(frames), False)


def encode_file(meta: bytes, pieces: Iterable[bytes | DataElement | RawDataElement],
                implicit: bool) -> bytes:
    """A file from its file meta and its dataset's pieces, already in tag order.

    A piece is either already encoded (bytes, from the functions above) or a
    (Raw)DataElement that pydicom encodes here, into the same buffer.
    """
    fp = _buffer(False)
    fp.write(meta)
    fp.is_implicit_VR = implicit
    for piece in pieces:
        if isinstance(piece, bytes):
            fp.write(piece)
        else:
            write_data_element(fp, piece)
    return fp.getvalue()


def compress_frame(frame: np.ndarray, transfer_syntax: str, bits_stored: int = 12) -> bytes:
    """Encode one uint16 frame with pydicom's encoder for the transfer syntax (pylibjpeg)."""
    from pydicom.pixels import get_encoder

    encoder = get_encoder(transfer_syntax)
    rows, cols = frame.shape
    return encoder.encode(
        np.ascontiguousarray(frame, dtype=np.uint16), encoding_plugin="pylibjpeg",
        rows=rows, columns=cols, samples_per_pixel=1, bits_allocated=16,
        bits_stored=bits_stored, pixel_representation=0,
        photometric_interpretation="MONOCHROME2", number_of_frames=1,
    )


def part10(sop_class: str, sop_instance: str, transfer_syntax: str, body: bytes) -> bytes:
    """A complete file: meta header followed by the already encoded dataset body."""
    return file_meta(sop_class, sop_instance, transfer_syntax) + body
