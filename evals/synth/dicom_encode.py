"""A small DICOM Part 10 encoder for the generator's own, known set of elements.

pydicom spends about 0.1 ms per element when it writes (VR checks, charset
handling, sorting); a cohort has hundreds of thousands of files with ~50
elements each, so the generator encodes elements itself: a series' shared
elements are encoded once and only the handful that change per file (UIDs,
instance number, trigger time, position) are encoded per file. Everything
written here is read back with pydicom in the tests.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
ENCAPSULATED = {RLE_LOSSLESS, JPEG2000_LOSSLESS}
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1404.1"  # fixed, for reproducible files
IMPLEMENTATION_VERSION = "CMRSYNTH_01"

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_BINARY = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d"}

# an element is (tag, VR, value); a sequence value is a list of items (lists of elements)
Element = tuple[int, str, object]


def format_ds(x: float) -> str:
    """Decimal String of at most 16 characters, as precise as fits."""
    for digits in (10, 9, 8, 7, 6):
        s = f"{float(x):.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot write {x!r} as a DS")


def _value_bytes(vr: str, value, implicit: bool) -> bytes:
    if vr == "SQ":
        out = bytearray()
        for item in value:
            body = encode_elements(item, implicit)
            out += struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
        return bytes(out)
    if vr == "AT":
        tags = value if isinstance(value, (list, tuple)) else [value]
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in tags)
    if vr in _BINARY:
        vals = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
        return struct.pack(f"<{len(vals)}{_BINARY[vr]}", *vals)
    if vr in ("OB", "OW", "UN"):
        b = bytes(value)
        return b + b"\0" if len(b) % 2 else b
    if isinstance(value, (list, tuple)):
        text = "\\".join(format_ds(v) if vr == "DS" else str(v) for v in value)
    else:
        text = format_ds(value) if vr == "DS" and not isinstance(value, str) else str(value)
    b = text.encode("latin-1")
    if len(b) % 2:
        b += b"\0" if vr == "UI" else b" "
    return b


def encode_element(tag: int, vr: str, value, implicit: bool = False) -> bytes:
    """One data element, little endian, explicit or implicit VR."""
    body = _value_bytes(vr, value, implicit)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(body)) + body
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", len(body)) + body
    if len(body) > 0xFFFF:
        raise ValueError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) too long for {vr}")
    return head + vr.encode() + struct.pack("<H", len(body)) + body


def encode_text(tag: int, vr: str, text: str, implicit: bool = False) -> bytes:
    """Fast path for one short string element whose text is already formatted."""
    b = text.encode("latin-1")
    if len(b) % 2:
        b += b"\0" if vr == "UI" else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(b)) + b
    return head + vr.encode() + struct.pack("<H", len(b)) + b


def encode_elements(elements: Iterable[Element], implicit: bool = False) -> bytes:
    """Elements in ascending tag order, as a dataset body."""
    return b"".join(encode_element(t, vr, v, implicit) for t, vr, v in sorted(elements))


def encoded_parts(elements: Iterable[Element], implicit: bool) -> dict[int, bytes]:
    """Each element encoded on its own, keyed by tag (for per-file merging)."""
    return {t: encode_element(t, vr, v, implicit) for t, vr, v in elements}


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """128-byte preamble, 'DICM' and the File Meta Information group."""
    before, after = meta_template(sop_class, transfer_syntax)
    return file_meta_from(before, after, sop_instance)


def meta_template(sop_class: str, transfer_syntax: str) -> tuple[bytes, bytes]:
    """The meta elements before and after (0002,0003), which differ per file."""
    before = encode_elements([(0x00020001, "OB", b"\x00\x01"), (0x00020002, "UI", sop_class)])
    after = encode_elements([
        (0x00020010, "UI", transfer_syntax),
        (0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
        (0x00020013, "SH", IMPLEMENTATION_VERSION),
    ])
    return before, after


def file_meta_from(before: bytes, after: bytes, sop_instance: str) -> bytes:
    """File meta from a template and the file's SOP Instance UID."""
    body = before + encode_text(0x00020003, "UI", sop_instance) + after
    return (b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body)


def native_pixel_data(pixels: np.ndarray, implicit: bool) -> bytes:
    """(7FE0,0010) with uncompressed little-endian 16-bit pixels."""
    data = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    head = struct.pack("<HH", 0x7FE0, 0x0010)
    if implicit:
        return head + struct.pack("<I", len(data)) + data
    return head + b"OW\0\0" + struct.pack("<I", len(data)) + data


def encapsulated_pixel_data(frames: Sequence[bytes]) -> bytes:
    """(7FE0,0010) OB with undefined length: offset table, one fragment per frame."""
    offsets, pos = [], 0
    items = []
    for f in frames:
        f = f + b"\0" if len(f) % 2 else f
        offsets.append(pos)
        items.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f)
        pos += 8 + len(f)
    bot = struct.pack(f"<{len(offsets)}I", *offsets) if len(frames) > 1 else b""
    out = struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", 0xFFFFFFFF)
    out += struct.pack("<HHI", 0xFFFE, 0xE000, len(bot)) + bot + b"".join(items)
    return out + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def compress_frame(frame: np.ndarray, transfer_syntax: str, bits_stored: int = 12) -> bytes:
    """Encode one uint16 frame with pydicom's encoder for the transfer syntax."""
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
