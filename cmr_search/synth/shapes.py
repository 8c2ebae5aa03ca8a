"""The phantom's shapes and their exact volumes.

The shape profiles every structure is drawn with (the LV wall thickness around the
circumference, the akinetic apex, the smooth ramps of the cycle) and the integrals that
turn them into true volumes: cylindrical shells for the LV cavity and epicardium, the
ray/ellipse intersection for the RV, closed forms for the atrial caps, a fine grid for
the thrombus. ``phantom.py`` solves for the shapes that hit a study's targets with these;
``tissues.py`` draws the same shapes, so labels are the rendered images' geometric truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LVShape", "akinesis_weight", "ellipsoid_cap_volume", "lv_cavity_volume", "lv_epicardial_volume",
    "rv_volume", "smoothstep", "thrombus_volume", "wall_moments", "wall_profile",
]

AKINESIS_BAND = (-0.75, -0.58)  # z/L0 over which contraction fades out towards the apex


@dataclass(frozen=True)
class LVShape:
    """ED shape constants of the LV used by the volume integrals (mm)."""

    r0: float  # basal cavity radius
    length_ed: float  # cavity length at ED
    akinesis: bool
    apical: float  # myocardium beyond the cavity apex
    septal: float  # equatorial wall parameters of W(theta)
    lateral: float
    focality: float


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Cubic ramp 0 -> 1 over x in [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def akinesis_weight(z: np.ndarray, length_ed: float, akinesis: bool) -> np.ndarray:
    """Share of the normal contraction at height z (0 in an akinetic apex)."""
    if not akinesis:
        return np.ones_like(z)
    lo, hi = AKINESIS_BAND
    return smoothstep((z / length_ed - lo) / (hi - lo))


def wall_profile(cos_theta: np.ndarray, septal: float, lateral: float, focality: float):
    """Equatorial wall thickness W(theta), theta measured from the septum (e_x)."""
    return lateral + (septal - lateral) * (0.5 * (1.0 + cos_theta)) ** focality


def wall_moments(septal: float, lateral: float, focality: float) -> tuple[float, float]:
    """Integrals of W and W^2 over the full circle (the epicardial volume needs both)."""
    # periodic trapezoid is spectral
    theta = np.linspace(0.0, 2 * np.pi, 4096, endpoint=False)
    w = wall_profile(np.cos(theta), septal, lateral, focality)
    d = 2 * np.pi / theta.size
    return float(w.sum() * d), float((w * w).sum() * d)


def _trapz(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.sum(0.5 * (y[..., 1:] + y[..., :-1]) * np.diff(x, axis=-1), axis=-1)


def lv_cavity_volume(ph_r0, length, c, length_ed, akinesis, n=4001) -> np.ndarray:
    """Cavity volume (mm^3) for arrays of length L and contraction c (same shape)."""
    length = np.atleast_1d(np.asarray(length, float))[:, None]
    c = np.atleast_1d(np.asarray(c, float))[:, None]
    z = -length * np.linspace(1.0, 0.0, n)[None, :]
    rc = ph_r0 * (1.0 - c * akinesis_weight(z, length_ed, akinesis))
    return _trapz(np.pi * rc**2 * (1.0 - (z / length) ** 2), z)


def lv_epicardial_volume(r0, length, c, kappa, apical, w1, w2, length_ed, akinesis, n=4001):
    """Volume (mm^3) inside the epicardium for arrays of L, c and kappa."""
    length = np.atleast_1d(np.asarray(length, float))[:, None]
    c = np.atleast_1d(np.asarray(c, float))[:, None]
    kappa = np.atleast_1d(np.asarray(kappa, float))[:, None]
    k_apex = 1.0 + (kappa - 1.0) * akinesis_weight(-length, length_ed, akinesis)
    l_epi = length + k_apex * apical
    z = -l_epi * np.linspace(1.0, 0.0, n)[None, :]
    w = akinesis_weight(z, length_ed, akinesis)
    rc = r0 * (1.0 - c * w)
    k = 1.0 + (kappa - 1.0) * w
    area = 0.5 * (1.0 - (z / l_epi) ** 2) * (2 * np.pi * rc**2 + 2 * k * rc * w1 + k * k * w2)
    return _trapz(area, z)


def rv_volume(lv: LVShape, rv_xmin, axes, frame_c, frame_kappa, frame_len, nz=240, nt=360):
    """RV cavity volume (mm^3): half ellipsoid (z <= 0) minus the LV epicardium.

    In each z slice the ray from the LV axis at angle theta meets the convex
    ellipse in one interval [rho1, rho2] and the star-shaped epicardium in
    [0, r_epi], so the RV area is a 1-D integral over theta.
    """
    ax, ay, az = axes
    cx = rv_xmin + ax
    z = -az * (1.0 - (np.arange(nz) + 0.5) / nz)  # midpoints in (-az, 0)
    th = (np.arange(nt) + 0.5) * (2 * np.pi / nt)
    cos_t, sin_t = np.cos(th)[None, :], np.sin(th)[None, :]
    f = np.sqrt(np.clip(1.0 - (z / az) ** 2, 0.0, None))[:, None]
    a2, b2 = (ax * f) ** 2 + 1e-12, (ay * f) ** 2 + 1e-12
    qa = cos_t**2 / a2 + sin_t**2 / b2
    qb = cx * cos_t / a2
    qc = cx**2 / a2 - 1.0
    disc = np.clip(qb**2 - qa * qc, 0.0, None)
    rho2 = (qb + np.sqrt(disc)) / qa
    rho1 = np.clip((qb - np.sqrt(disc)) / qa, 0.0, None)
    rho2 = np.where(disc > 0, np.clip(rho2, 0.0, None), 0.0)
    r_epi = _epi_radius(lv, z[:, None], cos_t, frame_c, frame_kappa, frame_len)
    inner = np.maximum(rho1, r_epi)
    area = 0.5 * np.clip(rho2**2 - inner**2, 0.0, None).sum(axis=1) * (2 * np.pi / nt)
    return float(area.sum() * (az / nz))


def _epi_radius(lv: LVShape, z, cos_t, c, kappa, length):
    """LV epicardial radius at heights z and angles theta (0 outside its z range)."""
    w = akinesis_weight(z, lv.length_ed, lv.akinesis)
    k_apex = 1.0 + (kappa - 1.0) * float(akinesis_weight(np.array(-length), lv.length_ed,
                                                         lv.akinesis))
    l_epi = length + k_apex * lv.apical
    rc = lv.r0 * (1.0 - c * w)
    k = 1.0 + (kappa - 1.0) * w
    wall = wall_profile(cos_t, lv.septal, lv.lateral, lv.focality)
    s = np.sqrt(np.clip(1.0 - (z / l_epi) ** 2, 0.0, None))
    return np.where(z >= -l_epi, (rc + k * wall) * s, 0.0)


def ellipsoid_cap_volume(axes: np.ndarray, center_z: float) -> float:
    """Volume (mm^3) of an ellipsoid above z = 0 whose centre is at height center_z."""
    a, b, c = axes
    lo = max(-c, -center_z)
    return float(np.pi * a * b * ((c - lo) - (c**3 - lo**3) / (3 * c * c)))


def thrombus_volume(r0, l0, cz, radii, akinesis) -> float:
    """Volume (mm^3) of the thrombus inside the (static, akinetic) apical cavity."""
    if radii[0] <= 0:
        return 0.0
    a, b, c = radii
    h = 0.3  # mm; the thrombus is a few ml, so this grid is well below 1% error
    xs = np.arange(-a, a + h, h)
    ys = np.arange(-b, b + h, h)
    zs = np.arange(cz - c, cz + c + h, h)
    x, y, z = np.meshgrid(xs, ys, zs, indexing="ij", sparse=True)
    inside = (x / a) ** 2 + (y / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0
    rc = r0 * np.sqrt(np.clip(1 - (z / l0) ** 2, 0.0, None))
    in_cavity = (x * x + y * y <= rc * rc) & (z >= -l0) & (z <= 0)
    assert akinesis, "a thrombus needs the static akinetic apex"
    return float((inside & in_cavity).sum() * h**3)
