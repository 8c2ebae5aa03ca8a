"""Which tissue each point of the heart is: the phantom's shapes drawn as tissue codes.

``tissue_codes`` gives the code of every point at every asked frame (pericardial layers,
atria, aortic root, RV, LV myocardium and cavity, scar, thrombus), vectorised over frames;
``heart_roi`` bounds the points any of them can reach. The codes are geometry only: what
each looks like in a contrast is ``render.py``'s business.
"""

from __future__ import annotations

import numpy as np

from cmr_search.synth.phantom import Phantom
from cmr_search.synth.planes import Plane
from cmr_search.synth.shapes import akinesis_weight, wall_profile

__all__ = [
    "AORTA", "BACKGROUND", "EFFUSION", "EPICARDIAL_FAT", "LA", "LV_BLOOD", "LV_MYOCARDIUM", "N_CODES",
    "PERICARDIUM", "RA", "RV_BLOOD", "RV_WALL", "SCAR", "THROMBUS", "VESSEL_WALL",
    "contour_overlay", "heart_roi", "tissue_codes",
]

# tissue codes; where shapes overlap the highest code wins
BACKGROUND, PERICARDIUM, EFFUSION, EPICARDIAL_FAT, VESSEL_WALL = 0, 1, 2, 3, 4
RA, AORTA, LA, RV_WALL, RV_BLOOD, LV_MYOCARDIUM, SCAR, LV_BLOOD, THROMBUS = range(5, 14)
N_CODES = 14


def heart_roi(ph: Phantom, hx, hy, hz) -> np.ndarray:
    """Points (heart-frame coordinate arrays) that any heart structure (with pericardium) can reach."""
    margin = ph.epicardial_fat + ph.effusion + 6.0
    wall = max(ph.wall_septal, ph.wall_lateral) * float(ph.thickening.max())
    rv = ph.rv_axes[0]
    x_hi = max(ph.rv_xmin + 2 * rv[0] + ph.rv_wall, ph.ra_anchor[0] + ph.ra_axes_es[0]) + margin
    y_hi = max(rv[1] + ph.rv_wall, ph.lv_radius + wall, ph.la_axes_es[1] + 15) + margin
    top = max(ph.la_center_es[2] + ph.la_axes_es[2], ph.ra_center_es[2] + ph.ra_axes_es[2],
              (ph.aorta_base + ph.aorta_length * ph.aorta_dir)[2] + ph.aorta_radius)
    x_lo = -(ph.lv_radius + wall + margin + 10.0)
    z_lo = -(ph.lv_length_ed + ph.wall_apical * float(ph.thickening.max()) + margin)
    return (hx > x_lo) & (hx < x_hi) & (np.abs(hy) < y_hi) & (hz > z_lo) & (hz < top + 4.0)


def _envelope(ph: Phantom, x, y, z, rho, wall, d: float) -> np.ndarray:
    """Ventricles at ED inflated by d mm (the pericardial sac is drawn from these)."""
    l_epi = ph.lv_length_ed + ph.wall_apical + d
    s = np.sqrt(np.clip(1 - (z / l_epi) ** 2, 0, None))
    lv = (z >= -l_epi) & (rho <= (ph.lv_radius + wall + d) * s)
    ax, ay, az = ph.rv_axes[0] + ph.rv_wall + d
    cx = ph.rv_xmin + ph.rv_axes[0][0]
    rv = ((x - cx) / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2 <= 1
    return (z <= 0) & (lv | rv)


def tissue_codes(ph: Phantom, h, frames: np.ndarray, scar: bool = False):
    """Tissue code (T, N) uint8 of heart-frame points at the given frames.

    `h` is an (N, 3) array or a tuple of three coordinate arrays.

    Each structure is evaluated only on the points its bounding box can reach,
    vectorised over frames; overlaps resolve to the highest code.
    """
    cols = h if isinstance(h, tuple) else (h[:, 0], h[:, 1], h[:, 2])
    x, y, z = (np.ascontiguousarray(v, dtype=np.float32) for v in cols)
    rho2 = x * x + y * y
    rho = np.sqrt(rho2)
    cos_t = np.where(rho > 1e-6, x / np.maximum(rho, 1e-6), 1.0)
    wall = wall_profile(cos_t, ph.wall_septal, ph.wall_lateral, ph.focality).astype(np.float32)
    static = np.zeros(x.shape, np.uint8)
    f, e = ph.epicardial_fat, ph.effusion
    static[_envelope(ph, x, y, z, rho, wall, f + e + 1.5)] = PERICARDIUM
    if e > 0:
        static[_envelope(ph, x, y, z, rho, wall, f + e)] = EFFUSION
    static[_envelope(ph, x, y, z, rho, wall, f)] = EPICARDIAL_FAT
    codes = np.repeat(static[None, :], len(frames), axis=0)
    u8 = np.uint8

    def col(a):  # per-frame scalars as a column, broadcasting over points
        return np.asarray(a, np.float32)[frames][:, None]

    def merge(sel, group):
        codes[:, sel] = np.maximum(codes[:, sel], group)

    # atria and aortic root (above the base plane)
    up = np.flatnonzero(z >= 0)
    if up.size:
        xu, yu, zu = x[None, up], y[None, up], z[None, up]
        g = col(ph.atrial_scale)
        group = np.zeros((len(frames), up.size), u8)
        for anchor, center, axes, code in ((ph.ra_anchor, ph.ra_center_es, ph.ra_axes_es, RA),
                                           (ph.la_anchor, ph.la_center_es, ph.la_axes_es, LA)):
            d = [(v - a - g * (c - a)) for v, a, c in zip((xu, yu, zu), anchor, center)]
            q_in = sum((di / (g * ax)) ** 2 for di, ax in zip(d, axes))
            q_out = sum((di / (g * ax + 2)) ** 2 for di, ax in zip(d, axes))
            group = np.maximum(group, np.where(q_in <= 1, u8(code),
                                               np.where(q_out <= 1, u8(VESSEL_WALL), u8(0))))
        rel = [v[up] - np.float32(b) for v, b in zip((x, y, z), ph.aorta_base)]
        s = sum(r * np.float32(d) for r, d in zip(rel, ph.aorta_dir))
        d2 = sum(r * r for r in rel) - s * s
        along = (s >= -2) & (s <= ph.aorta_length)
        aorta = np.where(along & (d2 <= ph.aorta_radius**2), u8(AORTA),
                         np.where(along & (d2 <= (ph.aorta_radius + 2) ** 2), u8(VESSEL_WALL),
                                  u8(0)))
        merge(up, np.maximum(group, aorta[None, :]))

    # right ventricle: ellipsoid below the base plane; the LV codes are higher and win
    rv0 = ph.rv_axes[0]
    sel = np.flatnonzero((z <= 0) & (z >= -(rv0[2] + ph.rv_wall + 1))
                         & (np.abs(y) <= rv0[1] + ph.rv_wall + 1)
                         & (x >= ph.rv_xmin - ph.rv_wall - 1))
    if sel.size:
        ax, ay, az = (col(ph.rv_axes[:, i]) for i in range(3))
        dx = x[sel] - (ph.rv_xmin + ax)
        ys, zs = y[sel], z[sel]
        w = ph.rv_wall
        outer = (dx / (ax + w)) ** 2 + (ys / (ay + w)) ** 2 + (zs / (az + w)) ** 2 <= 1
        inner = (dx / ax) ** 2 + (ys / ay) ** 2 + (zs / az) ** 2 <= 1
        merge(sel, np.where(inner, u8(RV_BLOOD), np.where(outer, u8(RV_WALL), u8(0))))

    # left ventricle: myocardial shell, cavity, thrombus
    reach = ph.lv_radius + max(ph.wall_septal, ph.wall_lateral) * float(ph.thickening.max()) + 1
    depth = ph.lv_length_ed + ph.wall_apical * float(ph.thickening.max()) + 1
    sel = np.flatnonzero((z <= 0) & (z >= -depth) & (rho <= reach))
    if sel.size:
        zs, r2, ws = z[sel], rho2[sel], wall[sel]
        z2 = zs * zs
        wz = akinesis_weight(zs, ph.lv_length_ed, ph.akinesis).astype(np.float32)
        c, length, kappa = col(ph.contraction), col(ph.lv_length), col(ph.thickening)
        k_apex = 1 + (kappa - 1) * akinesis_weight(-length, ph.lv_length_ed, ph.akinesis)
        l_epi = length + k_apex * ph.wall_apical
        rc = ph.lv_radius * (1 - c * wz)
        cavity = (zs >= -length) & (r2 <= rc * rc * (1 - z2 / (length * length)))
        r_epi = (rc + (1 + (kappa - 1) * wz) * ws)
        epi = (zs >= -l_epi) & (r2 <= r_epi * r_epi * np.maximum(1 - z2 / (l_epi * l_epi), 0))
        group = np.where(cavity, u8(LV_BLOOD), np.where(epi, u8(LV_MYOCARDIUM), u8(0)))
        if scar and ph.akinesis:  # the akinetic apex is the infarct
            group = np.where((group == LV_MYOCARDIUM) & (wz < 0.5), u8(SCAR), group)
        a, b, cz = ph.thrombus_radii
        if a > 0:
            t_in = (x[sel] / a) ** 2 + (y[sel] / b) ** 2 + ((zs - ph.thrombus_center_z) / cz) ** 2
            group = np.where(cavity & (t_in <= 1), u8(THROMBUS), group)
        merge(sel, group)
    return codes


def contour_overlay(ph: Phantom, plane: Plane, frames: np.ndarray) -> np.ndarray:
    """Boolean (T, rows, cols): LV endocardial and epicardial contour pixels.

    Used for the derived (burnt-in segmentation) decoy series.
    """
    h = plane.coordinates(frame=ph.frame)
    codes = tissue_codes(ph, h, np.asarray(frames)).reshape(len(frames), plane.rows, plane.cols)
    out = np.zeros(codes.shape, bool)
    for region in (codes == LV_BLOOD, (codes == LV_BLOOD) | (codes == LV_MYOCARDIUM)):
        edge = np.zeros_like(region)
        edge[:, 1:, :] |= region[:, 1:, :] != region[:, :-1, :]
        edge[:, :, 1:] |= region[:, :, 1:] != region[:, :, :-1]
        out |= edge & region
    return out
