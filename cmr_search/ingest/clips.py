"""Canonical clips: decoded frames of one slice -> uint8 [T, H, W] over one cycle at a fixed
field of view with robust intensity scaling (pure functions)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from cmr_search.ingest.discover import FileRef
from cmr_search.ingest.reader import Elements, decode_options, elements, read_dataset, rescale
from cmr_search.ingest.series import ClipPlan
from cmr_search.store.config import ClipConfig

__all__ = ["PixelError", "clip_frames", "cycle_indices", "decode_stack", "fixed_fov", "make_clip", "read_frames", "robust_uint8"]


class PixelError(ValueError):
    """The pixel data of a planned clip could not be decoded into a clean stack."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where  # the file at fault, when one is


def cycle_indices(n: int, frames: int) -> np.ndarray:
    """Which of ``n`` acquired frames (one cycle, in order) make ``frames`` time points spread
    uniformly over the cycle: the nearest acquired frame to each, repeated when n < frames.

    Choosing acquired frames rather than blending neighbours keeps every clip frame a real
    image, and lets ingestion decode only these frames.
    """
    return np.floor(np.arange(frames) * (n / frames) + 0.5).astype(int) % n


def fixed_fov(stack: np.ndarray, pixel_spacing: tuple[float, float], size: int, fov_mm: float) -> np.ndarray:
    """Resample [T, H, W] to [T, size, size] covering ``fov_mm`` around the image centre.

    ``pixel_spacing`` is DICOM (row spacing, column spacing) in mm. Pillow's resize with a
    fractional box is an antialiased (area-aware) bilinear filter, so downsampling does not
    alias noise; outside the acquired image is 0 (air).
    """
    h, w = stack.shape[1:]
    half_rows, half_cols = fov_mm / pixel_spacing[0] / 2.0, fov_mm / pixel_spacing[1] / 2.0
    # Pillow boxes are in pixel-edge coordinates: the image centre is (w/2, h/2)
    box = [w / 2.0 - half_cols, h / 2.0 - half_rows, w / 2.0 + half_cols, h / 2.0 + half_rows]
    pad = int(np.ceil(max(0.0, -box[0], -box[1], box[2] - w, box[3] - h)))
    if pad:
        stack = np.pad(stack, ((0, 0), (pad, pad), (pad, pad)))
        box = [v + pad for v in box]
    out = np.empty((len(stack), size, size), np.float32)
    for t, frame in enumerate(stack.astype(np.float32, copy=False)):
        out[t] = Image.fromarray(frame).resize((size, size), Image.Resampling.BILINEAR, box=tuple(box))
    return out


def robust_uint8(clip: np.ndarray, low_percentile: float, high_percentile: float) -> np.ndarray:
    """Map the clip's [low, high] percentile window to 0..255 (one window for all frames)."""
    # every 3rd pixel estimates the percentiles as well and costs a third
    lo, hi = (float(v) for v in np.percentile(clip.ravel()[::3], [low_percentile, high_percentile]))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 1e-6:
        raise PixelError("the clip has no contrast (all pixels equal); the series is blank")
    # in place, in float32: the arithmetic is a third of the cost of cutting a clip
    scaled = np.subtract(clip, lo, dtype=np.float32)
    scaled *= 255.0 / (hi - lo)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def make_clip(stack: np.ndarray, pixel_spacing: tuple[float, float], cfg: ClipConfig) -> np.ndarray:
    """Decoded frames [N, H, W] of one slice, in cycle order -> canonical uint8 clip [T, S, S].

    A stack of exactly T frames is taken as already chosen by ``cycle_indices``."""
    cycle = stack[cycle_indices(len(stack), cfg.frames)].astype(np.float32, copy=False)
    return robust_uint8(fixed_fov(cycle, pixel_spacing, cfg.size, cfg.fov_mm), cfg.low_percentile, cfg.high_percentile)


def _pixels(ds: Dataset, elems: Elements) -> np.ndarray:
    """All frames of a dataset's pixel data, decoded by pydicom (from the buffer and the
    options read once from the header, where they are all present)."""
    options = decode_options(ds, elems)
    if options is None:
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise PixelError("missing pixel data")
        return ds.pixel_array
    buffer = ds.get_item("PixelData").value
    return get_decoder(options["transfer_syntax_uid"]).as_array(buffer, **options)[0]


def decode_stack(
    frames: list[tuple[FileRef, int]], rows: int, columns: int, load: Callable[[FileRef], Dataset]
) -> np.ndarray:
    """Decode the listed (file, frame) pairs into float32 [N, rows, columns], rescaled.

    ``load`` returns the full dataset of a file (already in memory, or read from disk).
    """
    wanted: dict = defaultdict(list)
    for pos, (ref, frame) in enumerate(frames):
        wanted[ref].append((pos, frame))
    out = np.empty((len(frames), rows, columns), np.float32)
    for ref, items in wanted.items():
        try:
            ds = load(ref)
            elems = elements(ds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = _pixels(ds, elems)
        except PixelError as err:
            raise PixelError(str(err), err.where or str(ref)) from err
        except Exception as err:  # decoders raise many types on truncated or corrupt data
            raise PixelError(f"pixel data cannot be decoded ({type(err).__name__}: {err})", str(ref)) from err
        if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():  # integers are always finite
            raise PixelError("non-finite pixel values", str(ref))
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.ndim != 3 or pixels.shape[1:] != (rows, columns):
            raise PixelError(f"pixel array shape {pixels.shape} does not match the header's {rows}x{columns}", str(ref))
        for pos, frame in items:
            if frame >= pixels.shape[0]:
                raise PixelError(f"frame {frame} missing from the pixel data", str(ref))
            slope, intercept = rescale(ds, elems, frame)
            if not (np.isfinite(slope) and np.isfinite(intercept)):
                raise PixelError(f"non-finite rescale slope {slope} or intercept {intercept}", str(ref))
            out[pos] = pixels[frame]  # in float32, in place: no float64 temporaries per frame
            if slope != 1.0 or intercept != 0.0:
                out[pos] *= slope
                out[pos] += intercept
    return out


def clip_frames(frames: list[tuple[FileRef, int]], cfg: ClipConfig) -> list[tuple[FileRef, int]]:
    """The (file, frame) pairs a clip needs out of a slice's full cycle."""
    return [frames[i] for i in cycle_indices(len(frames), cfg.frames)]


def read_frames(plan: ClipPlan, cfg: ClipConfig) -> np.ndarray:
    """Decode from disk the frames a planned clip needs (when no worker has them in memory)."""
    return decode_stack(clip_frames(plan.frames, cfg), plan.rows, plan.columns, lambda ref: read_dataset(ref, pixels=True))
