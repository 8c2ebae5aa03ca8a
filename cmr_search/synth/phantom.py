"""The 3-D cardiac phantom: the heart frame, its motion over the cycle, and the shapes
solved so that their true volumes hit the study's targets.

Heart frame: origin at the centre of the LV base (mitral) plane, e_z along the LV
long axis from apex to base (the apex is at negative z), e_x towards the septum
and the RV, e_y = e_z x e_x (anterior-superior). The frame is placed in DICOM
patient coordinates (LPS, mm) with the apex pointing left, anterior and inferior.

Every shape is an implicit function of heart-frame coordinates and a handful of
per-frame scalars, and every volume label is integrated from exactly those
functions (``shapes.py``: cylindrical shells for the LV, ray/ellipse intersection for
the RV, closed forms for the atria), so labels are the phantom's geometric truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cmr_search.synth.params import StudyParams, lv_axes, sample_study_params
from cmr_search.synth.shapes import (
    LVShape,
    ellipsoid_cap_volume,
    lv_cavity_volume,
    lv_epicardial_volume,
    rv_volume,
    smoothstep,
    thrombus_volume,
    wall_moments,
)

__all__ = [
    "HeartFrame", "Phantom", "StudyParams", "Volumes", "build_phantom",
    "cycle_phase", "heart_frame", "sample_study_params",
]

MYOCARDIAL_DENSITY_G_PER_ML = 1.05
LONGITUDINAL_SHORTENING = 0.35  # share of the radial contraction applied to the LV length
ATRIAL_MIN_FRACTION = 0.55  # atrial volume at end diastole relative to its maximum
WALL_LEVEL = -0.35  # z/L0 of the mid-ventricular level where wall thickness is measured


@dataclass(frozen=True)
class HeartFrame:
    """Placement of the heart frame in patient coordinates (LPS, mm)."""

    origin: np.ndarray  # (3,) centre of the LV base plane
    axes: np.ndarray  # (3, 3) rows e_x, e_y, e_z as LPS unit vectors

    def to_heart(self, points: np.ndarray) -> np.ndarray:
        """Patient (N, 3) -> heart-frame (N, 3) coordinates, in the points' precision."""
        # einsum, not @: BLAS thread start-up dominates for a 3x3 transform
        rel = points - self.origin.astype(points.dtype)
        return np.einsum("nj,ij->ni", rel, self.axes.astype(points.dtype))

    def to_patient(self, points: np.ndarray) -> np.ndarray:
        """Heart-frame (N, 3) -> patient (N, 3) coordinates."""
        return self.origin + np.asarray(points) @ self.axes


@dataclass(frozen=True)
class Volumes:
    """True geometric volumes (ml), thicknesses (mm) and mass (g) of a phantom."""

    lv_blood_ml: np.ndarray  # (T,) cavity minus thrombus
    rv_ml: np.ndarray  # (T,)
    la_ml: np.ndarray  # (T,)
    ra_ml: np.ndarray  # (T,)
    lv_myocardium_ml: float
    thrombus_ml: float
    lvedv_ml: float
    lvesv_ml: float
    lvef: float  # percent
    lv_mass_g: float
    rvedv_ml: float
    rvesv_ml: float
    rvef: float
    la_max_ml: float
    ra_max_ml: float
    septal_mm: float
    lateral_mm: float


@dataclass(frozen=True)
class Phantom:
    """Geometry of one study's heart over its cardiac cycle (all lengths in mm)."""

    frame: HeartFrame
    n_frames: int
    es_frame: int
    phase: np.ndarray  # (T,) contraction state, 0 at ED and 1 at ES
    # LV: cavity radius R0 (1 - c w(z)) sqrt(1 - (z/L)^2); epicardium adds k W(theta)
    lv_radius: float
    lv_length_ed: float
    lv_length: np.ndarray  # (T,)
    contraction: np.ndarray  # (T,) radial contraction c
    thickening: np.ndarray  # (T,) wall scale kappa that conserves myocardial volume
    wall_septal: float  # equatorial wall parameters of W(theta)
    wall_lateral: float
    wall_apical: float
    focality: float
    akinesis: bool
    thrombus_center_z: float
    thrombus_radii: tuple[float, float, float]  # zero radii: no thrombus
    # RV: ellipsoid centred (rv_xmin + ax, 0, 0), clipped to z <= 0, minus the LV epicardium
    rv_xmin: float
    rv_axes: np.ndarray  # (T, 3)
    rv_wall: float
    # atria: ellipsoids scaled about their anchor on the base plane, clipped to z >= 0
    la_anchor: np.ndarray
    la_center_es: np.ndarray
    la_axes_es: np.ndarray
    ra_anchor: np.ndarray
    ra_center_es: np.ndarray
    ra_axes_es: np.ndarray
    atrial_scale: np.ndarray  # (T,) linear scale of both atria
    # aortic root: a tube from the base plane on the anterior-septal side
    aorta_base: np.ndarray
    aorta_dir: np.ndarray
    aorta_radius: float
    aorta_length: float
    lvot_dir: np.ndarray  # unit in-plane direction of the 3CH plane (z = 0)
    epicardial_fat: float
    effusion: float
    volumes: Volumes


def unit(v: np.ndarray) -> np.ndarray:
    """The vector scaled to length 1."""
    return v / np.linalg.norm(v)


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix about a unit axis."""
    a = unit(np.asarray(axis, dtype=float))
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def heart_frame(params: StudyParams) -> HeartFrame:
    """Place the heart frame in LPS: apex left, anterior, inferior, with jitter."""
    apex_dir = unit(np.array([0.6, -0.55, -0.58]))
    apex_dir = rotation([1, 0, 0], params.axis_tilt_deg[0]) @ apex_dir
    apex_dir = rotation([0, 1, 0], params.axis_tilt_deg[1]) @ apex_dir
    ez = -apex_dir
    septal_ref = np.array([-0.8, -0.6, -0.1])  # towards the patient's right and front
    ex = unit(septal_ref - (septal_ref @ ez) * ez)
    ex = rotation(ez, params.axis_roll_deg) @ ex
    ey = np.cross(ez, ex)
    origin = np.array([10.0, -8.0, 18.0]) + np.asarray(params.heart_offset_mm)
    return HeartFrame(origin=origin, axes=np.stack([ex, ey, ez]))


def cycle_phase(n_frames: int, es_frame: int) -> np.ndarray:
    """Contraction state per frame: 0 at ED (frame 0), 1 exactly at the ES frame.

    Systole is a half cosine; diastole has rapid filling, diastasis and an atrial
    kick, as a volume-time curve does.
    """
    t = np.arange(n_frames) / n_frames
    t_es = es_frame / n_frames
    u = np.clip((t - t_es) / (1.0 - t_es), 0.0, 1.0)
    diastole = 1.0 - 0.8 * smoothstep(u / 0.45) - 0.2 * smoothstep((u - 0.75) / 0.25)
    systole = 0.5 * (1.0 - np.cos(np.pi * np.minimum(t / t_es, 1.0)))
    return np.where(t <= t_es, systole, diastole)


def _solve(f, lo, hi, iters: int = 14, tol: float = 1e-7) -> np.ndarray:
    """Vectorised root of an increasing f bracketed by [lo, hi] (Illinois regula falsi).

    A root outside the bracket clamps to the nearer end.
    """
    lo, hi = np.array(lo, float), np.array(hi, float)
    flo, fhi = np.asarray(f(lo), float), np.asarray(f(hi), float)
    x = np.where(flo >= 0, lo, np.where(fhi <= 0, hi, 0.5 * (lo + hi)))
    active = (flo < 0) & (fhi > 0)
    side = np.zeros(x.shape, int)
    scale = np.abs(flo) + np.abs(fhi)
    for _ in range(iters):
        if not active.any():
            break
        x = np.where(active, (lo * fhi - hi * flo) / np.where(active, fhi - flo, 1.0), x)
        fx = np.asarray(f(x), float)
        pos = active & (fx > 0)
        neg = active & ~(fx > 0)
        # Illinois: when one end is kept twice, halve its value so it moves too
        flo = np.where(pos & (side == 1), 0.5 * flo, np.where(neg, fx, flo))
        fhi = np.where(neg & (side == -1), 0.5 * fhi, np.where(pos, fx, fhi))
        hi, lo = np.where(pos, x, hi), np.where(neg, x, lo)
        side = np.where(pos, 1, np.where(neg, -1, side))
        active &= np.abs(fx) > tol * scale
    return x


def _solve_lv(params: StudyParams, r0: float, l0: float):
    """Radial contraction, length and thickening per frame, and the wall parameters."""
    phase = cycle_phase(params.n_frames, params.es_frame)
    # remote contraction that would give the target EF without akinesis (closed form)
    ef = params.lvef_target / 100.0
    c_max = float(_solve(lambda c: 1 - (1 - c) ** 2 * (1 - LONGITUDINAL_SHORTENING * c) - ef,
                          0.0, 0.8))
    lam = 0.0 if params.apical_akinesis else LONGITUDINAL_SHORTENING  # akinetic apex stays put
    c = c_max * phase
    length = l0 * (1.0 - lam * c)
    # equatorial W chosen so the radial thickness at the mid level equals the target
    l_epi = l0 + params.apical_mm
    zm = WALL_LEVEL * l0
    s_c = math.sqrt(1 - (zm / l0) ** 2)
    s_e = math.sqrt(1 - (zm / l_epi) ** 2)
    wall = {name: (t + r0 * s_c) / s_e - r0
            for name, t in (("septal", params.septal_mm), ("lateral", params.lateral_mm))}
    lv = LVShape(r0=r0, length_ed=l0, akinesis=params.apical_akinesis, apical=params.apical_mm,
                 septal=wall["septal"], lateral=wall["lateral"], focality=params.septal_focality)
    w1, w2 = wall_moments(lv.septal, lv.lateral, lv.focality)

    def myo(kappa, cc, ll, n=1201):
        epi = lv_epicardial_volume(r0, ll, cc, kappa, lv.apical, w1, w2, l0, lv.akinesis, n)
        return epi - lv_cavity_volume(r0, ll, cc, l0, lv.akinesis, n)

    m0 = float(myo(1.0, 0.0, l0, 8001)[0])
    m0_coarse = float(myo(1.0, 0.0, l0, 801)[0])  # same grid as the solve, so kappa[0] == 1
    kappa = _solve(lambda k: myo(k, c, length, 801) - m0_coarse, np.full_like(c, 0.5),
                   np.full_like(c, 4.0))
    kappa[0] = 1.0
    return phase, c, length, kappa, lv, m0


def build_phantom(params: StudyParams) -> Phantom:
    """Build the study's 3-D heart over one cycle and integrate its true volumes."""
    r0, l0 = lv_axes(params.lv_edv_target_ml, params.lv_sphericity)
    phase, c, length, kappa, lv, m0 = _solve_lv(params, r0, l0)
    es = params.es_frame
    cavity = lv_cavity_volume(r0, length, c, l0, params.apical_akinesis, 8001)

    # apical thrombus: an ellipsoid on the axis resting in the (akinetic) apex
    t_r = params.thrombus_radius_mm
    t_radii = (t_r, 0.85 * t_r, 1.25 * t_r) if params.thrombus else (0.0, 0.0, 0.0)
    t_cz = -l0 + 1.25 * t_r + 1.5
    thrombus = thrombus_volume(r0, l0, t_cz, t_radii, params.apical_akinesis)
    lv_blood = cavity - thrombus

    # RV: size by bisection on a shape scale, function by bisection on its contraction
    rv_xmin = -0.25 * r0

    def rv_axes(scale, crv, s):
        az = 0.85 * l0 * (scale / r0) ** 0.3
        return np.array([scale * (1 - crv * s), 1.45 * scale * (1 - 0.3 * crv * s),
                         min(az, 1.05 * l0) * (1 - 0.35 * crv * s)])

    def rv_vol(axes, f, n_z=48, n_t=72):
        return rv_volume(lv, rv_xmin, axes, c[f], kappa[f], length[f], n_z, n_t)

    scale = float(_solve(lambda s: rv_vol(rv_axes(s, 0, 0), 0) - params.rv_edv_target_ml * 1e3,
                          0.5 * r0, 4.0 * r0))
    rv_ed = rv_vol(rv_axes(scale, 0, 0), 0, 160, 240)
    target_es = rv_ed * (1 - params.rvef_target / 100.0)
    c_rv = float(_solve(lambda k: target_es - rv_vol(rv_axes(scale, k, 1.0), es), 0.0, 0.7))
    rv_axes_t = np.stack([rv_axes(scale, c_rv, s) for s in phase])
    rv = np.array([rv_vol(rv_axes_t[f], f, 160, 240) if f in (0, es) else np.nan
                   for f in range(params.n_frames)])

    # 3CH direction: from 4CH (e_x) towards the anterior wall (e_y), where the LVOT is
    alpha = math.radians(params.three_ch_angle_deg)
    lvot = np.array([math.cos(alpha), math.sin(alpha), 0.0])

    # atria: size a = (V / shape constant)^(1/3); centre 0.7 c above the base plane
    def atrium(volume_ml):
        axes_unit = np.array([1.0, 1.0, 1.1])
        unit = ellipsoid_cap_volume(axes_unit, 0.7 * 1.1)
        a = (volume_ml * 1e3 / unit) ** (1 / 3)
        return axes_unit * a

    la_axes = atrium(params.la_volume_target_ml)
    ra_axes = atrium(params.ra_volume_target_ml)
    la_xy = -0.35 * la_axes[0] * lvot[:2]
    # keep the RA clear of the LA: horizontal centre distance > a_la + a_ra + 3 mm
    gap = la_axes[0] + ra_axes[0] + 3.0
    ra_x = max(rv_xmin + scale, math.sqrt(max(gap**2 - la_xy[1] ** 2, 0.0)) + la_xy[0])
    la_anchor = np.array([la_xy[0], la_xy[1], 0.0])
    ra_anchor = np.array([ra_x, 0.0, 0.0])
    la_center = la_anchor + np.array([0, 0, 0.7 * la_axes[2]])
    ra_center = ra_anchor + np.array([0, 0, 0.7 * ra_axes[2]])
    atrial_scale = (ATRIAL_MIN_FRACTION + (1 - ATRIAL_MIN_FRACTION) * phase) ** (1 / 3)
    la_max = ellipsoid_cap_volume(la_axes, la_center[2])
    ra_max = ellipsoid_cap_volume(ra_axes, ra_center[2])

    aorta_radius = 10.5 + 0.06 * (params.age - 20) + 0.08 * (r0 - 25)
    aorta_base = np.array([*(0.72 * r0 * lvot[:2]), 0.0])
    tilt = math.radians(25.0)
    aorta_dir = unit(np.array([*(math.sin(tilt) * lvot[:2]), math.cos(tilt)]))

    volumes = Volumes(
        lv_blood_ml=lv_blood / 1e3,
        rv_ml=rv / 1e3,
        la_ml=la_max * atrial_scale**3 / 1e3,
        ra_ml=ra_max * atrial_scale**3 / 1e3,
        lv_myocardium_ml=m0 / 1e3,
        thrombus_ml=thrombus / 1e3,
        lvedv_ml=float(lv_blood[0] / 1e3),
        lvesv_ml=float(lv_blood[es] / 1e3),
        lvef=float(100.0 * (lv_blood[0] - lv_blood[es]) / lv_blood[0]),
        lv_mass_g=float(m0 / 1e3 * MYOCARDIAL_DENSITY_G_PER_ML),
        rvedv_ml=float(rv[0] / 1e3),
        rvesv_ml=float(rv[es] / 1e3),
        rvef=float(100.0 * (rv[0] - rv[es]) / rv[0]),
        la_max_ml=la_max / 1e3,
        ra_max_ml=ra_max / 1e3,
        septal_mm=float(params.septal_mm),
        lateral_mm=float(params.lateral_mm),
    )
    return Phantom(
        frame=heart_frame(params), n_frames=params.n_frames, es_frame=es, phase=phase,
        lv_radius=r0, lv_length_ed=l0, lv_length=length, contraction=c, thickening=kappa,
        wall_septal=lv.septal, wall_lateral=lv.lateral, wall_apical=params.apical_mm,
        focality=params.septal_focality, akinesis=params.apical_akinesis,
        thrombus_center_z=t_cz, thrombus_radii=t_radii,
        rv_xmin=rv_xmin, rv_axes=rv_axes_t, rv_wall=params.rv_wall_mm,
        la_anchor=la_anchor, la_center_es=la_center, la_axes_es=la_axes,
        ra_anchor=ra_anchor, ra_center_es=ra_center, ra_axes_es=ra_axes,
        atrial_scale=atrial_scale,
        aorta_base=aorta_base, aorta_dir=aorta_dir, aorta_radius=aorta_radius,
        aorta_length=55.0, lvot_dir=lvot,
        epicardial_fat=params.epicardial_fat_mm, effusion=params.effusion_mm,
        volumes=volumes,
    )


