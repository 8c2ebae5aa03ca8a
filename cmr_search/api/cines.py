"""Cine loops as animated images: a clip (uint8 [T, H, W], one cardiac cycle) becomes an
animated WebP or GIF that loops at the acquired heart rate; files are cached in the
study's folder under ``STORE/cache/studies`` (withdrawal removes it with the study)."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from cmr_search.core.layout import StoreLayout

__all__ = ["CineCache", "cine_bytes"]

MEDIA_TYPES = {"webp": "image/webp", "gif": "image/gif"}


def cine_bytes(clip: np.ndarray, frame_ms: float, fmt: str = "webp") -> bytes:
    """An endlessly looping animated image of a grey clip [T, H, W] (uint8)."""
    clip = np.asarray(clip)
    if clip.ndim != 3 or clip.dtype != np.uint8 or not len(clip):
        raise ValueError(f"a cine needs a uint8 clip [T, H, W]; got {clip.dtype} {clip.shape}")
    frames = [Image.fromarray(f) for f in clip]
    duration = max(20, round(frame_ms))  # browsers clamp faster frames anyway
    buf = io.BytesIO()
    if fmt == "webp":
        frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=duration, loop=0,
                       lossless=False, quality=80, method=4)
    elif fmt == "gif":
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0,
                       optimize=False, disposal=1)
    else:
        raise ValueError(f"cine format {fmt!r}: use webp or gif")
    return buf.getvalue()


class CineCache:
    """Cine files of one store, made on first request and kept until the clip changes."""

    def __init__(self, store_root: Path, fmt: str = "webp"):
        self.layout, self.fmt = StoreLayout(store_root), fmt

    def path(self, study_uid: str, clip_id: str, stamp: str) -> Path:
        """Where the cine of this clip, as written at ``stamp``, is cached."""
        name = hashlib.sha256(f"{clip_id}:{stamp}".encode()).hexdigest()[:24]
        return self.layout.study_cache(study_uid) / f"cine-{name}.{self.fmt}"

    def get(self, study_uid: str, clip_id: str, stamp: str, make) -> Path:
        """The cached file, made by ``make() -> (clip, frame_ms)`` when missing."""
        path = self.path(study_uid, clip_id, stamp)
        if not path.exists():
            clip, frame_ms = make()
            data = cine_bytes(clip, frame_ms, self.fmt)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # concurrent makers: the last rename wins, each file whole
        return path
