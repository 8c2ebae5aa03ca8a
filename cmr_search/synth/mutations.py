"""Malformed DICOM made from valid files: what a careless export, a broken disk or an
attacker hands the ingestion. Each mutation is a pure function of (file bytes, a seeded
generator) -> bytes; ``write_mutations`` writes a folder of them for a fuzzing round
(``benchmarks/fuzz_dicom.py``, and a short round in the tests).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

__all__ = ["MUTATIONS", "write_mutations"]


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    """Cut the file anywhere: in the preamble, the header, or the pixels."""
    return data[: int(rng.integers(0, len(data)))]


def flip_header_bits(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip a few bits in the first 2 KiB (tags, VRs, lengths, values)."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(0, min(len(out), 2048)))
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def wrong_transfer_syntax(data: bytes, rng: np.random.Generator) -> bytes:
    """Declare a transfer syntax the pixels are not in (big endian, JPEG, deflate, nonsense)."""
    ds = _dataset(data)
    ds.file_meta.TransferSyntaxUID = str(rng.choice([
        "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.90",
        "1.2.3.4.5.6",
    ]))
    out = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(out, ds.file_meta, enforce_standard=False)
    body = data[data.index(b"DICM") + 4:]
    meta_end = _meta_length(data)
    return data[:128] + b"DICM" + out.getvalue() + body[meta_end:]


def _meta_length(data: bytes) -> int:
    """Bytes of the file meta group after the DICM marker (its group length element included)."""
    start = data.index(b"DICM") + 4
    length = int.from_bytes(data[start + 8:start + 12], "little")  # (0002,0000) UL, explicit VR LE
    return 12 + length


def zero_dimensions(data: bytes, rng: np.random.Generator) -> bytes:
    """Rows and/or Columns of 0."""
    ds = _dataset(data)
    which = int(rng.integers(0, 3))
    if which in (0, 2):
        ds.Rows = 0
    if which in (1, 2):
        ds.Columns = 0
    return _bytes(ds)


def huge_dimensions(data: bytes, rng: np.random.Generator) -> bytes:
    """Dimensions and frame counts no scanner writes (and no memory holds)."""
    ds = _dataset(data)
    ds.Rows, ds.Columns = 65535, 65535
    if rng.random() < 0.5:
        ds.NumberOfFrames = 100000
    return _bytes(ds)


def missing_pixels(data: bytes, rng: np.random.Generator) -> bytes:
    """The header of an image without its pixel data."""
    ds = _dataset(data)
    if "PixelData" in ds:
        del ds.PixelData
    return _bytes(ds)


def not_dicom(data: bytes, rng: np.random.Generator) -> bytes:
    """Noise, zeros or text under a .dcm name, about the size of the original."""
    size = int(rng.integers(1, max(2, len(data))))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return rng.bytes(size)
    if kind == 1:
        return bytes(size)
    return (b"patient notes, not an image\n" * (size // 28 + 1))[:size]


MUTATIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "truncate": truncate,
    "flip_header_bits": flip_header_bits,
    "wrong_transfer_syntax": wrong_transfer_syntax,
    "zero_dimensions": zero_dimensions,
    "huge_dimensions": huge_dimensions,
    "missing_pixels": missing_pixels,
    "not_dicom": not_dicom,
}


def write_mutations(sources: list[Path], out: Path, n: int, seed: int = 0, loops: bool = True) -> dict[str, int]:
    """Write ``n`` mutated copies of files drawn from ``sources`` into ``out`` (one folder
    per mutation kind), and with ``loops`` a symbolic link from a folder to its parent.
    Returns how many files of each kind were written."""
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(MUTATIONS, 0)
    names = list(MUTATIONS)
    for i in range(n):
        kind = names[i % len(names)]
        source = sources[int(rng.integers(0, len(sources)))]
        try:
            data = MUTATIONS[kind](source.read_bytes(), rng)
        except (InvalidDicomError, ValueError, KeyError, AttributeError):
            data = truncate(source.read_bytes(), rng)  # a source this mutation cannot parse: cut it instead
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"m{i:06d}.dcm").write_bytes(data)
        counts[kind] += 1
    if loops:
        (out / "loop").mkdir(parents=True, exist_ok=True)
        link = out / "loop" / "parent"
        if not link.exists():
            link.symlink_to(out, target_is_directory=True)
    return counts
