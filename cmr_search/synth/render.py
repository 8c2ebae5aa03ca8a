"""Rendering a plane of the phantom at given frames, as a bSSFP-like magnitude image.

Pipeline per plane: tissue codes of the heart (``tissues.py``: static pericardial layers
once, moving chambers per frame, vectorised over frames) over a static torso
background -> signal per tissue -> in-plane PSF blur -> smooth coil bias field
(defined in patient coordinates, so it agrees between views) -> Rician noise.
Signal units: blood = 1 before bias and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmr_search.synth.params import StudyParams
from cmr_search.synth.phantom import Phantom
from cmr_search.synth.planes import Plane
from cmr_search.synth.tissues import (
    AORTA,
    EFFUSION,
    EPICARDIAL_FAT,
    LA,
    LV_BLOOD,
    LV_MYOCARDIUM,
    N_CODES,
    PERICARDIUM,
    RA,
    RV_BLOOD,
    RV_WALL,
    SCAR,
    THROMBUS,
    VESSEL_WALL,
    heart_roi,
    tissue_codes,
)

# signal per tissue; background tissues are named, heart tissues use the codes above
CINE = {
    "air": 0.0, "lung": 0.06, "fat": 0.88, "muscle": 0.26, "soft": 0.32, "liver": 0.36,
    "bone": 0.42, "csf": 0.92, "blood": 1.0,
    PERICARDIUM: 0.07, EFFUSION: 0.93, EPICARDIAL_FAT: 0.86, VESSEL_WALL: 0.22, RA: 1.0,
    AORTA: 1.0, LA: 1.0, RV_WALL: 0.24, RV_BLOOD: 1.0, LV_MYOCARDIUM: 0.24, LV_BLOOD: 1.0,
    THROMBUS: 0.45, SCAR: 0.24,
}
# late gadolinium enhancement: nulled myocardium, bright scar, dark thrombus
LGE = {
    "air": 0.0, "lung": 0.03, "fat": 0.55, "muscle": 0.12, "soft": 0.18, "liver": 0.28,
    "bone": 0.3, "csf": 0.1, "blood": 0.55,
    PERICARDIUM: 0.35, EFFUSION: 0.12, EPICARDIAL_FAT: 0.5, VESSEL_WALL: 0.2, RA: 0.55,
    AORTA: 0.55, LA: 0.55, RV_WALL: 0.05, RV_BLOOD: 0.55, LV_MYOCARDIUM: 0.03, LV_BLOOD: 0.58,
    THROMBUS: 0.04, SCAR: 0.95,
}


@dataclass(frozen=True)
class Appearance:
    """Per-study smooth fields (texture, coil bias) and contrast jitter."""

    texture_k: np.ndarray  # (K, 3) wave vectors, rad/mm
    texture_phase: np.ndarray  # (K,)
    bias_k: np.ndarray  # (3, 3)
    bias_phase: np.ndarray  # (3,)
    bias_gradient: np.ndarray  # (3,) per mm
    bias_strength: float
    myocardium_scale: float  # jitter of the blood/myocardium contrast, times the site's
    noise_bank: np.ndarray  # (2, H, W) standard normals; frames read shifted windows
    noise_seed: int
    noise_sigma: float
    noise_real: np.ndarray  # sigma * bank[0], precomputed for the study's sigma
    noise_imag_sq: np.ndarray  # (sigma * bank[1]) ** 2


NOISE_PAD = 64


def study_appearance(params: StudyParams, max_rows: int = 256, max_cols: int = 256) -> Appearance:
    """Draw the study's texture, bias field and noise bank from its seeds."""
    rng = np.random.default_rng(params.texture_seed)
    k_dir = rng.normal(size=(12, 3))
    k_dir /= np.linalg.norm(k_dir, axis=1, keepdims=True)
    texture_k = k_dir * (2 * np.pi / rng.uniform(12.0, 60.0, size=(12, 1)))
    b_dir = rng.normal(size=(3, 3))
    b_dir /= np.linalg.norm(b_dir, axis=1, keepdims=True)
    bias_k = b_dir * (2 * np.pi / rng.uniform(250.0, 600.0, size=(3, 1)))
    grad = rng.normal(size=3) * np.array([0.3, 1.0, 0.3])  # mostly anterior-posterior
    grad /= 200.0 * np.linalg.norm(grad)
    noise_rng = np.random.default_rng(params.noise_seed)
    # a bank of noise read at random offsets: drawing fresh normals for every
    # pixel of every frame would dominate the generation time
    bank = noise_rng.standard_normal((2, max_rows + NOISE_PAD, max_cols + NOISE_PAD),
                                     dtype=np.float32)
    sigma = np.float32(params.noise_sigma)
    # the site's myocardium contrast scales the per-study jitter (1.0 leaves it exact)
    return Appearance(texture_k, rng.uniform(0, 2 * np.pi, 12), bias_k,
                      rng.uniform(0, 2 * np.pi, 3), grad, params.bias_strength,
                      float(rng.uniform(0.85, 1.15)) * params.myocardium_contrast, bank,
                      params.noise_seed,
                      params.noise_sigma, bank[0] * sigma, (bank[1] * sigma) ** 2)


def plane_waves(plane: Plane, k: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Sum over waves of cos(k . p + phase) at every pixel of a plane, (rows, cols).

    On a plane each wave's argument is a row term plus a column term, so the sum
    is two small matrix products instead of a cosine per pixel and wave.
    """
    a = np.outer(np.arange(plane.cols) * plane.spacing, k @ plane.row_dir)  # (cols, K)
    b = np.outer(np.arange(plane.rows) * plane.spacing, k @ plane.col_dir)
    b += k @ plane.position + phase  # (rows, K)
    return (np.cos(b) @ np.cos(a).T - np.sin(b) @ np.sin(a).T).astype(np.float32)


def texture(plane: Plane, app: Appearance) -> np.ndarray:
    """Smooth zero-mean random field of unit-ish amplitude on the plane, (rows, cols)."""
    return plane_waves(plane, app.texture_k, app.texture_phase) / np.float32(
        np.sqrt(len(app.texture_phase) / 2))


def bias_field(plane: Plane, app: Appearance) -> np.ndarray:
    """Multiplicative coil sensitivity on the plane (rows, cols); smooth, around 1.

    Defined in patient coordinates, so every view of a study sees the same coil.
    """
    low = plane_waves(plane, app.bias_k, app.bias_phase) / np.float32(np.sqrt(3))
    ramp = (plane.position @ app.bias_gradient
            + np.arange(plane.rows)[:, None] * plane.spacing * (plane.col_dir @ app.bias_gradient)
            + np.arange(plane.cols)[None, :] * plane.spacing * (plane.row_dir @ app.bias_gradient))
    return np.exp(app.bias_strength * (0.6 * low - ramp)).astype(np.float32)


_BG_TISSUES = ("air", "soft", "muscle", "fat", "lung", "liver", "bone", "csf", "blood")
_BG_TEXTURE = (0.0, 0.10, 0.08, 0.05, 0.30, 0.06, 0.10, 0.0, 0.0)  # relative texture depth


def background(xyz: tuple, params: StudyParams, tex: np.ndarray, contrast: dict) -> np.ndarray:
    """Signal of the torso around the heart at patient points (x, y, z arrays).

    Torso ellipse with subcutaneous fat and a muscle layer, two lungs, the liver
    below the right hemidiaphragm, a vertebral body, the spinal canal and the
    descending aorta; tissues are textured by the study's smooth random field.
    """
    x, y, z = xyz
    a, b = params.torso_mm
    fat = params.subcutaneous_fat_mm
    u8 = np.uint8
    label = np.ones(x.shape, u8)  # soft tissue

    def inside(cx, cy, sx, sy, cz=0.0, sz=np.inf):
        q = ((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2
        return q <= 1 if np.isinf(sz) else q + ((z - cz) / sz) ** 2 <= 1

    label[~inside(0, 0, a - fat - 12, b - fat - 12)] = 2  # muscle under the fat
    label[~inside(0, 0, a - fat, b - fat)] = 3
    lungs = inside(-88, 18, 62, 85, 25, 150) | inside(98, 25, 55, 82, 25, 140)
    label[lungs & inside(0, 0, a - fat - 14, b - fat - 14)] = 4
    label[inside(-45, 15, 115, 95, -150, 95)] = 5
    label[inside(0, b - 42, 18, 18)] = 6
    label[inside(0, b - 17, 7, 7)] = 7
    label[inside(24, b - 68, 11, 11)] = 8
    label[~inside(0, 0, a, b)] = 0
    level = np.array([contrast[t] for t in _BG_TISSUES], np.float32)
    depth = np.array(_BG_TEXTURE, np.float32)
    return level[label] * (1 + depth[label] * tex)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """3-tap separable approximation of a Gaussian PSF over the last two axes."""
    w = np.float32(min(0.5 * sigma_px**2, 0.3))  # variance of [w, 1-2w, w] is 2w
    out = img * (1 - 2 * w)
    out[..., 1:, :] += w * img[..., :-1, :]
    out[..., :-1, :] += w * img[..., 1:, :]
    out[..., 0, :] += w * img[..., 0, :]
    out[..., -1, :] += w * img[..., -1, :]
    res = out * (1 - 2 * w)
    res[..., :, 1:] += w * out[..., :, :-1]
    res[..., :, :-1] += w * out[..., :, 1:]
    res[..., :, 0] += w * out[..., :, 0]
    res[..., :, -1] += w * out[..., :, -1]
    return res


def render_plane(
    ph: Phantom,
    params: StudyParams,
    app: Appearance,
    plane: Plane,
    frames: np.ndarray | None = None,
    *,
    contrast: dict | None = None,
    noise: bool = True,
    bias: bool = True,
    surroundings: bool = True,
    noise_stream: int = 0,
) -> np.ndarray:
    """Magnitude images (T, rows, cols) float32 of one plane at the given frames.

    `surroundings=False` puts the heart in uniform fat (a test aid for segmenting
    the myocardium); `noise_stream` picks the windows of the noise bank, so two
    planes with different streams get different noise.
    """
    frames = np.arange(ph.n_frames) if frames is None else np.asarray(frames)
    contrast = CINE if contrast is None else contrast
    h = plane.coordinates(frame=ph.frame)
    tex = texture(plane, app).ravel()
    if surroundings:
        bg = background(plane.coordinates(), params, tex, contrast)
    else:
        bg = np.full(tex.shape, contrast["fat"], np.float32)
    lut = np.array([np.nan] + [contrast[c] for c in range(1, N_CODES)], np.float32)
    if contrast is CINE:
        lut[LV_MYOCARDIUM] *= app.myocardium_scale
        lut[RV_WALL] *= app.myocardium_scale
        lut[SCAR] = lut[LV_MYOCARDIUM]
    rows, cols = plane.rows, plane.cols
    roi = heart_roi(ph, *h).reshape(rows, cols)
    base = _blur(bg.reshape(rows, cols), params.blur_px)  # the static scene
    heart, box = None, (slice(0, 0), slice(0, 0))
    if roi.any():
        r_idx, c_idx = np.flatnonzero(roi.any(axis=1)), np.flatnonzero(roi.any(axis=0))
        r0, r1 = max(r_idx[0] - 1, 0), min(r_idx[-1] + 2, rows)
        c0, c1 = max(c_idx[0] - 1, 0), min(c_idx[-1] + 2, cols)
        box_roi = roi[r0:r1, c0:c1].ravel()
        flat = (np.arange(r0, r1)[:, None] * cols + np.arange(c0, c1)[None, :]).ravel()
        inside = flat[box_roi]
        codes = np.zeros((len(frames), flat.size), np.uint8)
        codes[:, box_roi] = tissue_codes(ph, tuple(v[inside] for v in h), frames,
                                         scar=contrast is not CINE)
        sig = np.where(codes > 0, lut[codes], bg[flat])
        sig = _blur(sig.reshape(len(frames), r1 - r0, c1 - c0), params.blur_px)
        # the outermost ring of the box saw the box edge, not the background
        heart, box = sig[:, 1:-1, 1:-1], (slice(r0 + 1, r1 - 1), slice(c0 + 1, c1 - 1))
    gain = bias_field(plane, app) if bias else np.ones((rows, cols), np.float32)
    sigma = params.noise_sigma if noise else 0.0
    return compose(base, heart, box, gain, app, sigma, noise_stream, len(frames))


def compose(base: np.ndarray, heart: np.ndarray | None, box: tuple, gain: np.ndarray,
            app: Appearance, sigma: float, stream: int, n_frames: int) -> np.ndarray:
    """Frames = static scene with the moving heart box pasted in, times the coil
    gain, plus Rician noise: |s * gain + n_re + i n_im| (sigma 0: no noise).

    Noise comes from windows of the study's noise bank at random offsets.
    """
    rows, cols = base.shape
    out = np.empty((n_frames, rows, cols), np.float32)
    scene = base * gain
    box_gain = gain[box]
    if sigma <= 0:
        out[:] = scene
        if heart is not None:
            out[(slice(None), *box)] = heart * box_gain
        return out
    if sigma == app.noise_sigma:
        real, imag_sq = app.noise_real, app.noise_imag_sq
    else:
        real = app.noise_bank[0] * np.float32(sigma)
        imag_sq = (app.noise_bank[1] * np.float32(sigma)) ** 2
    offsets = np.random.default_rng([app.noise_seed, stream]).integers(0, NOISE_PAD, (n_frames, 2))
    for i, (dr, dc) in enumerate(offsets):
        n_re = real[dr: dr + rows, dc: dc + cols]
        re = out[i]
        np.add(scene, n_re, out=re)
        if heart is not None:
            np.multiply(heart[i], box_gain, out=re[box])
            re[box] += n_re[box]
        re *= re
        re += imag_sq[dr: dr + rows, dc: dc + cols]
        np.sqrt(re, out=re)
    return out


def flow_phase(ph: Phantom, params: StudyParams, app: Appearance, plane: Plane,
               frames: np.ndarray, magnitude: np.ndarray, noise_stream: int) -> np.ndarray:
    """Through-plane velocity / VENC (T, rows, cols) in [-1, 1] for a phase-contrast plane.

    Systolic forward flow with a parabolic profile in the aortic lumen, phase noise
    that grows as the magnitude falls, and random phase where there is no signal.
    """
    rel = [v - np.float32(b) for v, b in zip(plane.coordinates(frame=ph.frame), ph.aorta_base)]
    s = sum(r * np.float32(d) for r, d in zip(rel, ph.aorta_dir))
    d2 = sum(r * r for r in rel) - s * s
    lumen = ((s >= 0) & (s <= ph.aorta_length)
             & (d2 <= ph.aorta_radius**2)).reshape(plane.rows, plane.cols)
    profile = np.clip(1 - d2 / ph.aorta_radius**2, 0, None).reshape(plane.rows, plane.cols)
    t = np.asarray(frames) / ph.n_frames
    t_es = ph.es_frame / ph.n_frames
    peak = 0.6 + 0.25 * (1 - (params.lvef_target - 15) / 60)  # weaker hearts eject slower
    systolic = np.where(t < t_es, np.sin(np.pi * np.minimum(t / t_es, 1.0)), 0.0)
    vel = (peak * systolic)[:, None, None] * profile * lumen
    rng = np.random.default_rng([app.noise_seed, noise_stream, 7])
    sigma = params.noise_sigma / np.maximum(magnitude, 0.05)
    vel = vel + sigma * rng.standard_normal(vel.shape, dtype=np.float32)
    noise_only = magnitude < 3 * params.noise_sigma
    vel = np.where(noise_only, rng.uniform(-1, 1, vel.shape), vel)
    return np.clip(vel, -1.0, 1.0).astype(np.float32)


