"""Canonical clips: decoded frames of one slice -> uint8 [T, H, W] over one cycle at a fixed
field of view with robust intensity scaling (pure functions)."""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from scipy import ndimage

from indexer.config import ClipConfig
from indexer.discover import open_bytes
from indexer.series import ClipPlan

__all__ = ["resample_cycle", "fixed_fov", "robust_uint8", "make_clip", "read_frames", "PixelError"]


class PixelError(ValueError):
    """The pixel data of a planned clip could not be decoded into a clean stack."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where  # the file at fault, when one is


def resample_cycle(stack: np.ndarray, frames: int) -> np.ndarray:
    """Sample ``frames`` time points uniformly over the cycle that ``stack`` [N, H, W] spans.

    The cycle is periodic, so the sample after the last frame interpolates towards frame 0.
    """
    n = stack.shape[0]
    t = np.arange(frames) * (n / frames)
    lo = np.floor(t).astype(int) % n
    hi = (lo + 1) % n
    w = (t - np.floor(t)).astype(np.float32)[:, None, None]
    return stack[lo] * (1 - w) + stack[hi] * w


def fixed_fov(stack: np.ndarray, pixel_spacing: tuple[float, float], size: int, fov_mm: float) -> np.ndarray:
    """Resample [T, H, W] to [T, size, size] covering ``fov_mm`` around the image centre.

    ``pixel_spacing`` is DICOM (row spacing, column spacing) in mm. Downsampling is
    preceded by a Gaussian so that fine noise does not alias; outside the image is 0.
    """
    out_mm = fov_mm / size
    step = np.array([out_mm / pixel_spacing[0], out_mm / pixel_spacing[1]])
    sigma = np.maximum(step - 1.0, 0.0) / 2.0
    if np.any(sigma > 0):
        stack = ndimage.gaussian_filter(stack, sigma=(0, sigma[0], sigma[1]), mode="nearest")
    h, w = stack.shape[1:]
    centre_in = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    centre_out = (size - 1) / 2.0
    offset = np.concatenate([[0.0], centre_in - step * centre_out])
    return ndimage.affine_transform(
        stack,
        matrix=np.array([1.0, step[0], step[1]]),
        offset=offset,
        output_shape=(stack.shape[0], size, size),
        order=1,
        mode="constant",
        cval=0.0,
    )


def robust_uint8(clip: np.ndarray, low_percentile: float, high_percentile: float) -> np.ndarray:
    """Map the clip's [low, high] percentile window to 0..255 (one window for all frames)."""
    lo, hi = np.percentile(clip, [low_percentile, high_percentile])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 1e-6:
        raise PixelError("the clip has no contrast (all pixels equal); the series is blank")
    scaled = (clip - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def make_clip(stack: np.ndarray, pixel_spacing: tuple[float, float], cfg: ClipConfig) -> np.ndarray:
    """Decoded frames [N, H, W] of one slice, in cycle order -> canonical uint8 clip [T, S, S]."""
    cycle = resample_cycle(stack.astype(np.float32, copy=False), cfg.frames)
    return robust_uint8(fixed_fov(cycle, pixel_spacing, cfg.size, cfg.fov_mm), cfg.low_percentile, cfg.high_percentile)


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    """Rescale slope and intercept of one frame, classic or Enhanced MR."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[frame] if len(groups) > frame else groups[0]
        pvt = item.get("PixelValueTransformationSequence")
        if pvt:
            return float(pvt[0].get("RescaleSlope", 1) or 1), float(pvt[0].get("RescaleIntercept", 0) or 0)
    return 1.0, 0.0


def read_frames(plan: ClipPlan) -> np.ndarray:
    """Decode the planned frames of one slice into float32 [N, rows, cols], rescaled."""
    wanted: dict = defaultdict(list)
    for pos, (ref, frame) in enumerate(plan.frames):
        wanted[ref].append((pos, frame))
    out = np.empty((len(plan.frames), plan.rows, plan.columns), np.float32)
    for ref, items in wanted.items():
        try:
            with open_bytes(ref) as fp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(fp, force=True)
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                raise PixelError("missing pixel data", str(ref))
            pixels = ds.pixel_array
        except PixelError:
            raise
        except Exception as err:  # decoders raise many types on truncated or corrupt data
            raise PixelError(f"pixel data cannot be decoded ({type(err).__name__}: {err})", str(ref)) from err
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.ndim != 3 or pixels.shape[1:] != (plan.rows, plan.columns):
            raise PixelError(f"pixel array shape {pixels.shape} does not match the header's {plan.rows}x{plan.columns}", str(ref))
        for pos, frame in items:
            if frame >= pixels.shape[0]:
                raise PixelError(f"frame {frame} missing from the pixel data", str(ref))
            slope, intercept = _rescale(ds, frame)
            out[pos] = pixels[frame] * slope + intercept
    if not np.all(np.isfinite(out)):
        raise PixelError("non-finite pixel values")
    return out
