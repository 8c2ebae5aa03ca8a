"""The reader (header values, pixel decode options) agrees with pydicom on real files.

Ingestion reads header values from the raw element bytes and hands pydicom's decoders the
pixel buffer with options read from those bytes (both for speed). These tests hold that to
pydicom's answers on every file pydicom and pydicom-data ship: explicit and implicit VR,
big endian, multi-frame, compressed, private tags.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from store_data import real_dicom_dirs

from cmr_search.ingest.clips import PixelError, decode_stack
from cmr_search.ingest.discover import FileRef, discover
from cmr_search.ingest.reader import decode_options, elements, rescale, text, transfer_syntax

KEYWORDS = [
    "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns", "NumberOfFrames",
    "AcquisitionTime", "PixelSpacing", "Manufacturer", "TriggerTime", "InstanceNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "PatientSex", "SeriesNumber", "SeriesTime", "ImageType", "StudyDate", "PatientAge",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel", "RescaleSlope", "RescaleIntercept",
]  # fmt: skip


def _real_files() -> list[Path]:
    return [Path(r.path) for r in discover(real_dicom_dirs())]


def _read(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - files pydicom cannot read are not reference cases
            return None


def _reference_text(ds, keyword: str) -> str:
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _numbers(text: str) -> list[float] | str:
    try:
        return [float(v) for v in text.split("\\")]
    except ValueError:
        return text


@pytest.fixture(scope="module")
def real_datasets():
    files = _real_files()
    assert len(files) > 100, "pydicom's test files and pydicom-data should give hundreds of files"
    return [(p, ds) for p in files if (ds := _read(p)) is not None]


def test_raw_header_values_equal_pydicom_conversion(real_datasets):
    checked = 0
    for path, ds in real_datasets:
        fast = elements(pydicom.dcmread(path, force=True))
        for keyword in KEYWORDS:
            if keyword not in ds:
                assert text(fast, keyword) == ""
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    expected = _reference_text(ds, keyword)
                except Exception:  # noqa: BLE001, S112 - pydicom itself cannot convert this (corrupt) value
                    continue
            got = text(fast, keyword)
            # numbers compare as numbers: pydicom prints DS '1.50' as 1.5
            assert _numbers(got) == _numbers(expected), f"{path.name} {keyword}: {got!r} != {expected!r}"
            checked += 1
    assert checked > 2000


def test_pixels_from_buffer_equal_pixel_array(real_datasets):
    compared = 0
    for path, ds in real_datasets:
        if "PixelData" not in ds or decode_options(ds, elements(ds)) is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = ds.pixel_array
        except Exception:  # noqa: BLE001, S112 - pydicom cannot decode it: decode_stack must then refuse it, tested below
            continue
        if expected.ndim != (3 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else 2) or ds.get("SamplesPerPixel", 1) != 1:
            continue  # colour files are not cines
        frames = expected if expected.ndim == 3 else expected[None]
        ref = FileRef(str(path))
        got = decode_stack([(ref, i) for i in range(len(frames))], ds.Rows, ds.Columns, lambda _, path=path: pydicom.dcmread(path))
        slopes = np.array([rescale(ds, elements(ds), i) for i in range(len(frames))], np.float32)
        want = frames.astype(np.float32) * slopes[:, 0, None, None] + slopes[:, 1, None, None]
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=path.name)
        compared += 1
    assert compared > 50


def test_undecodable_pixels_are_refused_with_the_file_named(tmp_path):
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"
    ds = pydicom.dcmread(path)
    assert transfer_syntax(ds) == ds.file_meta.TransferSyntaxUID
    del ds.PixelData
    broken = tmp_path / "no_pixels.dcm"
    ds.save_as(broken)
    ref = FileRef(str(broken))
    with pytest.raises(PixelError, match="missing pixel data") as err:
        decode_stack([(ref, 0)], ds.Rows, ds.Columns, lambda _: pydicom.dcmread(broken))
    assert err.value.where == str(ref)


def test_bytes_that_cannot_be_dicom_are_refused_without_a_lenient_parse(tmp_path):
    """A file with no preamble is parsed leniently only if it starts like a dataset: a
    lenient parse of zeros or noise costs seconds per MiB (a cheap upload made expensive)."""
    import time

    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import generate_uid

    from cmr_search.ingest.reader import read_dataset

    ds = Dataset()  # an image's identifying elements, written without preamble or file meta (ACR-NEMA style)
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    ds.StudyInstanceUID, ds.Modality = generate_uid(), "MR"
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[:2] == b"\x08\x00"
    assert read_dataset(FileRef(str(bare)), pixels=False).StudyInstanceUID == ds.StudyInstanceUID
    for name, content in (("zeros", bytes(4 << 20)), ("noise", np.random.default_rng(0).bytes(4 << 20))):
        path = tmp_path / name
        path.write_bytes(content)
        started = time.perf_counter()
        with pytest.raises(InvalidDicomError, match="not a DICOM element"):
            read_dataset(FileRef(str(path)), pixels=True)
        assert time.perf_counter() - started < 0.5
