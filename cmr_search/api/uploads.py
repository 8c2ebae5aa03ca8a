"""Unpacking an uploaded study safely: DICOM files or zip archives into a private folder.

Refused with the reason, as ``TooLarge``: more bytes than allowed, too many files, a zip
whose members would unpack to more than allowed (declared or actual); as
``InvalidUpload``: members, or an archive as a whole, that compress suspiciously well (a
zip bomb), absolute or
``..`` member paths, links, encrypted members, unreadable zips. Client file
names are never used as paths: every file is written under a generated name.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cmr_search.api.errors import InvalidUpload, TooLarge

__all__ = ["UploadLimits", "unpack_upload"]

_CHUNK = 1 << 20
#: below this many unpacked bytes an archive's ratio is not judged (a few tiny members)
_WHOLE_ARCHIVE_FLOOR = 1 << 20


@dataclass(frozen=True)
class UploadLimits:
    """How much one upload may hold."""

    max_bytes: int
    max_files: int
    max_unzipped_bytes: int
    max_zip_ratio: float


def _too_large(what: str, limit: int) -> TooLarge:
    return TooLarge("upload_too_large", f"{what} exceeds the limit of {limit:,} bytes; upload one study, "
                    "or ask the operator to raise CMR_MAX_UPLOAD_BYTES / CMR_MAX_UNZIPPED_BYTES")


def _copy(src: BinaryIO, dst: Path, budget: int, what: str, limit: int) -> int:
    """Copy at most ``budget`` bytes; more is an error (sizes in headers are not trusted)."""
    n = 0
    with open(dst, "wb") as out:
        while chunk := src.read(_CHUNK):
            n += len(chunk)
            if n > budget:
                raise _too_large(what, limit)
            out.write(chunk)
    return n


def _check_member(info: zipfile.ZipInfo, name: str, limits: UploadLimits) -> None:
    path = PurePosixPath(info.filename.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise InvalidUpload("unsafe_zip", f"{name}: member {info.filename!r} points outside the archive; "
                            "zip the study's files with relative paths")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InvalidUpload("unsafe_zip", f"{name}: member {info.filename!r} is a symbolic link; zip the files themselves")
    if info.flag_bits & 0x1:
        raise InvalidUpload("unsafe_zip", f"{name}: member {info.filename!r} is encrypted; upload it unencrypted")
    if info.file_size > 1 << 20 and info.file_size > limits.max_zip_ratio * max(info.compress_size, 1):
        raise InvalidUpload("zip_bomb", f"{name}: member {info.filename!r} unpacks {info.file_size / max(info.compress_size, 1):.0f}x "
                            f"its compressed size (limit {limits.max_zip_ratio:g}x); refusing a possible zip bomb")


def unpack_upload(parts: list[tuple[str, BinaryIO]], dest: Path, limits: UploadLimits) -> int:
    """Write the uploaded files (zips unpacked) into ``dest``; returns the number of files."""
    dest.mkdir(parents=True, exist_ok=True)
    if not parts:
        raise InvalidUpload("empty_upload", "no files in the upload; send the study's DICOM files or one zip of them "
                            "as multipart form field 'files'")
    received = unpacked = files = 0
    for i, (name, fp) in enumerate(parts):
        fp.seek(0, 2)
        size = fp.tell()
        fp.seek(0)
        received += size
        if received > limits.max_bytes:
            raise _too_large("the upload", limits.max_bytes)
        head = fp.read(4)
        fp.seek(0)
        if head != b"PK\x03\x04":  # not a zip: one file, kept for ingestion to judge
            files += 1
            if files > limits.max_files:
                raise TooLarge("too_many_files", f"more than {limits.max_files} files in one upload")
            unpacked += _copy(fp, dest / f"f{i:05d}.dcm", limits.max_unzipped_bytes - unpacked,
                              "the unpacked upload", limits.max_unzipped_bytes)
            continue
        try:
            archive = zipfile.ZipFile(fp)
            infos = [m for m in archive.infolist() if not m.is_dir()]
        except (zipfile.BadZipFile, EOFError, ValueError) as error:
            raise InvalidUpload("bad_zip", f"{name or f'file {i + 1}'} is not a readable zip ({error})") from error
        label = name or f"file {i + 1}"
        for info in infos:
            _check_member(info, label, limits)
        declared = sum(m.file_size for m in infos)
        # the archive as a whole: many small members of zeros pass every per-member check
        if declared > _WHOLE_ARCHIVE_FLOOR and declared > limits.max_zip_ratio * max(size, 1):
            raise InvalidUpload("zip_bomb", f"{label} unpacks {declared / max(size, 1):.0f}x its size (limit "
                                f"{limits.max_zip_ratio:g}x); refusing a possible zip bomb")
        files += len(infos)
        if files > limits.max_files:
            raise TooLarge("too_many_files", f"{label}: more than {limits.max_files} files in one upload")
        if unpacked + sum(m.file_size for m in infos) > limits.max_unzipped_bytes:
            raise _too_large(f"{label} unpacked", limits.max_unzipped_bytes)
        folder = dest / f"z{i:03d}"
        folder.mkdir()
        for j, info in enumerate(infos):
            try:
                with archive.open(info) as src:
                    budget = min(info.file_size, limits.max_unzipped_bytes - unpacked)
                    unpacked += _copy(src, folder / f"m{j:05d}.dcm", budget, f"{label} unpacked", limits.max_unzipped_bytes)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as error:
                shutil.rmtree(folder, ignore_errors=True)
                raise InvalidUpload("bad_zip", f"{label}: member {info.filename!r} cannot be read ({error})") from error
    return files
