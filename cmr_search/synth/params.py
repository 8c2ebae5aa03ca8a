"""Latent parameters of a synthetic study and their sampling from disease archetypes.

Every number that shapes a study (phenotype, acquisition physics, geometry jitter)
is drawn here, once, from the study's own random generator; everything downstream
(geometry, images, labels, reports, DICOM) is a deterministic function of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # site.py builds its profiles on this module's tables
    from cmr_search.synth.site import SiteProfile

# (archetype, prevalence). Shifts are applied on top of a sex-specific normal
# heart with independent jitter, so the groups overlap as real cohorts do.
ARCHETYPES: tuple[tuple[str, float], ...] = (
    ("normal", 0.45),
    ("hypertensive_lvh", 0.10),
    ("hcm", 0.05),
    ("dcm", 0.07),
    ("ischaemic_apical", 0.10),
    ("pulmonary_hypertension", 0.05),
    ("pericardial_effusion", 0.03),
    ("athlete", 0.04),
    ("mitral_regurgitation", 0.05),
    ("atrial_fibrillation", 0.04),
    ("hypokinetic", 0.02),
)

VENDOR_STYLES: tuple[tuple[str, float], ...] = (
    ("siemens", 0.30),
    ("ge", 0.20),
    ("philips", 0.20),
    ("ukbiobank", 0.20),
    ("kaggle", 0.10),
)

# Share of ischaemic studies with an apical thrombus (about 2.2% of the cohort).
THROMBUS_RATE_ISCHAEMIC = 0.22
# Slice thickness of every cine plane unless a site profile says otherwise.
DEFAULT_SLICE_THICKNESS_MM = 8.0


@dataclass(frozen=True)
class Patient:
    """Who is scanned: shared by every visit of the same patient."""

    patient_number: int
    sex: str  # "M" or "F"
    age_first_visit: float  # years
    height_cm: float
    bmi: float
    archetype: str


@dataclass(frozen=True)
class StudyParams:
    """All latent parameters of one synthetic study.

    Volumes named *_target are what the sampler asked for; the labels are
    measured on the geometry built from them (akinesis, thrombus and the RV/LV
    overlap move the true values away from the targets).
    """

    study_index: int
    patient_number: int
    visit_index: int  # 0 for the first study of a patient
    archetype: str
    sex: str
    age: float
    height_cm: float
    weight_kg: float
    bsa_m2: float
    # timing
    heart_rate_bpm: float
    n_frames: int  # frames per cardiac cycle, 20-40
    es_frame: int  # frame index of end systole (frame 0 is end diastole)
    # left ventricle
    lv_edv_target_ml: float
    lv_sphericity: float  # long-axis length / basal radius of the cavity at ED
    lvef_target: float  # percent, before any regional akinesis
    septal_mm: float  # ED wall thickness at the mid-ventricular level
    lateral_mm: float
    apical_mm: float  # myocardium beyond the cavity apex
    septal_focality: float  # exponent of the septal bulge; higher = more focal
    apical_akinesis: bool
    thrombus: bool
    thrombus_radius_mm: float
    # right heart, atria, pericardium
    rv_edv_target_ml: float
    rvef_target: float
    rv_wall_mm: float
    la_volume_target_ml: float  # maximal (end-systolic) volume
    ra_volume_target_ml: float
    effusion_mm: float
    epicardial_fat_mm: float
    # image physics
    noise_sigma: float  # Rician noise sigma relative to blood signal
    bias_strength: float  # amplitude of the log coil-bias field
    blur_px: float  # in-plane PSF sigma in pixels
    signal_gain: float  # stored-value units of blood signal
    pixel_spacing_mm: float
    rows: int
    cols: int
    vendor_style: str
    # geometry jitter
    axis_tilt_deg: tuple[float, float]  # rotations of the long axis about patient x and y
    axis_roll_deg: float  # rotation about the long axis
    heart_offset_mm: tuple[float, float, float]
    three_ch_angle_deg: float  # 3CH plane, from 4CH towards the LVOT
    lax_rotation_deg: tuple[float, float, float]  # planning error of 4CH, 2CH, 3CH
    view_offsets_mm: tuple[float, ...]  # (du, dv, dn) for 4CH, 2CH, 3CH, SAX
    sax_tilt_deg: tuple[float, float]
    sax_slices: int  # 8-12
    sax_spacing_mm: float
    sax_start_mm: float  # shift of the whole stack along the long axis
    torso_mm: tuple[float, float]  # semi-axes of the torso ellipse (x, y)
    subcutaneous_fat_mm: float
    texture_seed: int
    noise_seed: int
    # set by the site profile (synth/site.py); the defaults are the default cohort's
    slice_thickness_mm: float = DEFAULT_SLICE_THICKNESS_MM
    myocardium_contrast: float = 1.0  # myocardium / blood signal, relative to the default


def lv_axes(edv_ml: float, sphericity: float) -> tuple[float, float]:
    """Basal radius R and length L (mm) of a half-prolate cavity of volume edv_ml."""
    # V = 2/3 pi R^2 L with L = k R
    radius = (3.0 * edv_ml * 1000.0 / (2.0 * math.pi * sphericity)) ** (1.0 / 3.0)
    return radius, sphericity * radius


def bsa_mosteller(height_cm: float, weight_kg: float) -> float:
    """Body surface area (m^2) by the Mosteller formula."""
    return math.sqrt(height_cm * weight_kg / 3600.0)


def _pick(rng: np.random.Generator, table: tuple[tuple[str, float], ...]) -> str:
    names = [n for n, _ in table]
    p = np.array([w for _, w in table])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _n(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(mean, sd), lo, hi))


_AGE_RANGE = {
    "hcm": (20, 65), "dcm": (28, 75), "ischaemic_apical": (48, 85), "athlete": (18, 40),
    "atrial_fibrillation": (55, 85), "mitral_regurgitation": (40, 82),
    "hypertensive_lvh": (45, 82), "pulmonary_hypertension": (30, 78),
}


def sample_patient(rng: np.random.Generator, patient_number: int,
                   archetypes: tuple[tuple[str, float], ...] = ARCHETYPES) -> Patient:
    """Draw the demographics and the disease archetype of a new patient.

    `archetypes`: (archetype, weight) pairs, a site's case mix (default: ARCHETYPES).
    """
    archetype = _pick(rng, archetypes)
    male_share = {"hcm": 0.6, "dcm": 0.65, "ischaemic_apical": 0.75, "athlete": 0.7}
    sex = "M" if rng.random() < male_share.get(archetype, 0.52) else "F"
    lo, hi = _AGE_RANGE.get(archetype, (20, 80))
    age = float(rng.uniform(lo, hi))
    height = _n(rng, 176.0, 7.0, 155, 200) if sex == "M" else _n(rng, 163.0, 6.5, 145, 185)
    bmi = _n(rng, 22.5 if archetype == "athlete" else 26.5, 4.0, 18.0, 42.0)
    return Patient(patient_number, sex, age, height, bmi, archetype)


def _phenotype(rng: np.random.Generator, archetype: str, sex: str) -> dict:
    """Indexed volumes, function and walls: a normal heart shifted by the archetype."""
    male = sex == "M"
    p = {
        "edv_i": _n(rng, 82 if male else 74, 10 if male else 9, 50, 110),
        "sphericity": _n(rng, 3.1, 0.18, 2.6, 3.6),
        "lvef": _n(rng, 62, 4.5, 50, 75),
        "septal": _n(rng, 9.3 if male else 8.3, 1.0, 6.5, 11.8),
        "focality": 2.0,
        "rvedv_i": _n(rng, 86 if male else 77, 11 if male else 10, 55, 125),
        "rvef": _n(rng, 58, 5, 46, 72),
        "rv_wall": _n(rng, 3.2, 0.4, 2.5, 4.5),
        "la_i": _n(rng, 36, 6, 20, 55),
        "ra_i": _n(rng, 38, 7, 20, 60),
        "effusion": float(rng.uniform(0.5, 3.0)) if rng.random() < 0.12 else 0.0,
        "hr": _n(rng, 68, 10, 48, 105),
        "akinesis": False,
        "thrombus": False,
    }
    p["lateral"] = p["septal"] * _n(rng, 0.93, 0.05, 0.8, 1.05)
    if archetype == "hypertensive_lvh":
        p["septal"] = _n(rng, 13.4 if male else 12.4, 1.3, 11.0, 17.0)
        p["lateral"] = p["septal"] * _n(rng, 0.95, 0.05, 0.84, 1.05)
        p["edv_i"] *= 0.93
        p["lvef"] = _n(rng, 66, 5, 52, 75)
        p["la_i"] = _n(rng, 46, 8, 28, 75)
    elif archetype == "hcm":
        p["septal"] = _n(rng, 19.5, 3.0, 15.5, 30.0)
        p["lateral"] = _n(rng, 10.0, 1.3, 7.5, 13.0)
        p["focality"] = _n(rng, 4.0, 0.8, 2.5, 6.0)
        p["edv_i"] = _n(rng, 66, 9, 45, 90)
        p["sphericity"] = _n(rng, 3.3, 0.2, 2.8, 3.8)
        p["lvef"] = _n(rng, 70, 4, 60, 75)
        p["la_i"] = _n(rng, 56, 11, 35, 90)
    elif archetype == "dcm":
        p["edv_i"] = _n(rng, 145 if male else 132, 22, 105, 210)
        p["sphericity"] = _n(rng, 2.35, 0.18, 1.9, 2.8)
        p["lvef"] = _n(rng, 28, 7, 15, 43)
        p["septal"] = _n(rng, 7.8, 0.9, 6.0, 10.0)
        p["lateral"] = p["septal"] * _n(rng, 0.96, 0.05, 0.85, 1.05)
        p["la_i"] = _n(rng, 56, 11, 30, 90)
        p["rvef"] = _n(rng, 47, 9, 28, 65)
        p["rvedv_i"] *= 1.08
    elif archetype == "ischaemic_apical":
        p["akinesis"] = True
        p["thrombus"] = bool(rng.random() < THROMBUS_RATE_ISCHAEMIC)
        p["edv_i"] = _n(rng, 105, 20, 70, 170)
        p["lvef"] = _n(rng, 52, 8, 34, 66)
        p["sphericity"] = _n(rng, 2.8, 0.2, 2.3, 3.3)
        p["la_i"] = _n(rng, 44, 9, 25, 75)
        if p["thrombus"]:
            # thrombi form in large, poorly contracting ventricles
            p["edv_i"] = _n(rng, 148, 18, 120, 200)
            p["lvef"] = _n(rng, 42, 5, 32, 52)
    elif archetype == "pulmonary_hypertension":
        p["rvedv_i"] = _n(rng, 148 if male else 134, 22, 110, 220)
        p["rvef"] = _n(rng, 32, 7, 15, 44)
        p["rv_wall"] = _n(rng, 6.0, 1.0, 4.5, 9.0)
        p["ra_i"] = _n(rng, 70, 12, 45, 110)
        p["edv_i"] *= 0.85
    elif archetype == "pericardial_effusion":
        p["effusion"] = _n(rng, 12, 4, 5.5, 25)
    elif archetype == "athlete":
        p["edv_i"] = _n(rng, 110 if male else 100, 10, 85, 135)
        p["septal"] *= 1.12
        p["lateral"] *= 1.12
        p["rvedv_i"] *= 1.28
        p["lvef"] = _n(rng, 57, 4, 50, 68)
        p["hr"] = _n(rng, 52, 6, 42, 65)
        p["la_i"] = _n(rng, 44, 7, 30, 62)
    elif archetype == "mitral_regurgitation":
        p["edv_i"] = _n(rng, 110, 14, 80, 150)
        p["lvef"] = _n(rng, 63, 5, 50, 75)
        p["la_i"] = _n(rng, 72, 14, 45, 120)
    elif archetype == "atrial_fibrillation":
        p["la_i"] = _n(rng, 68, 12, 45, 110)
        p["ra_i"] = _n(rng, 66, 12, 40, 100)
        p["lvef"] = _n(rng, 52, 8, 35, 68)
        p["hr"] = _n(rng, 88, 14, 60, 125)
    elif archetype == "hypokinetic":
        p["lvef"] = _n(rng, 37, 4, 28, 46)
        p["edv_i"] = _n(rng, 90, 10, 70, 115)
    elif archetype != "normal":
        raise ValueError(f"unknown archetype {archetype!r}")
    return p


def _matrix(rng: np.random.Generator, spacing: float) -> tuple[int, int]:
    fov = rng.uniform(300.0, 380.0)
    cols = int(np.clip(round(fov / spacing), 160, 256))
    u = rng.random()
    aspect = 1.0 if u < 0.5 else (rng.uniform(0.75, 0.9) if u < 0.9 else rng.uniform(1.1, 1.25))
    rows = int(np.clip(round(cols * aspect), 160, 256))
    return rows, cols


def sample_study_params(
    rng: np.random.Generator,
    *,
    study_index: int = 0,
    patient: Patient | None = None,
    visit_index: int = 0,
    site: SiteProfile | None = None,
) -> StudyParams:
    """Draw every latent parameter of one study from its own generator.

    A repeat visit passes the earlier visits' `patient` so demographics and the
    archetype carry over while the phenotype is re-drawn around them. `site`
    (default: the internal profile) sets the vendor mix, the case mix of a new
    patient and the acquisition ranges; the internal profile draws exactly what
    this function drew before profiles existed.
    """
    if site is None:
        from cmr_search.synth.site import INTERNAL as site  # late: site.py imports this module
    if patient is None:
        patient = sample_patient(rng, study_index, site.archetypes)
    sex = patient.sex
    age = patient.age_first_visit + visit_index * float(rng.uniform(0.8, 3.5))
    weight = patient.bmi * (patient.height_cm / 100.0) ** 2 * float(rng.uniform(0.96, 1.04))
    bsa = bsa_mosteller(patient.height_cm, weight)
    ph = _phenotype(rng, patient.archetype, sex)

    style = _pick(rng, site.vendor_mix)
    hr = ph["hr"]
    if style == "kaggle":
        n_frames = 30
    else:
        # the same draw for every site keeps the internal stream unchanged; a site with a
        # fixed frame count (lo == hi) reconstructs that many phases whatever the rate
        temporal_res_ms = rng.uniform(22.0, 45.0)
        n_frames = int(np.clip(round(60000.0 / hr / temporal_res_ms), *site.frames))
    # systole takes a larger share of a shorter cycle
    es_fraction = float(np.clip(0.33 + 0.0025 * (hr - 60) + rng.normal(0, 0.015), 0.28, 0.48))
    es_frame = max(2, round(es_fraction * n_frames))

    edv = ph["edv_i"] * bsa
    _, length = lv_axes(edv, ph["sphericity"])
    apical = _n(rng, 0.75 * min(ph["septal"], ph["lateral"]), 0.8, 4.0, 12.0)
    cover = length + apical + 4.0
    sax_slices = int(np.clip(round(cover / 9.0), 8, 12))
    sax_spacing = float(np.clip(cover / sax_slices, 7.5, 11.0))

    spacing = float(rng.uniform(*site.pixel_spacing_mm))
    rows, cols = _matrix(rng, spacing)
    return StudyParams(
        study_index=study_index,
        patient_number=patient.patient_number,
        visit_index=visit_index,
        archetype=patient.archetype,
        sex=sex,
        age=age,
        height_cm=patient.height_cm,
        weight_kg=weight,
        bsa_m2=bsa,
        heart_rate_bpm=hr,
        n_frames=n_frames,
        es_frame=es_frame,
        lv_edv_target_ml=edv,
        lv_sphericity=ph["sphericity"],
        lvef_target=ph["lvef"],
        septal_mm=ph["septal"],
        lateral_mm=ph["lateral"],
        apical_mm=apical,
        septal_focality=ph["focality"],
        apical_akinesis=ph["akinesis"],
        thrombus=ph["thrombus"],
        thrombus_radius_mm=float(rng.uniform(6.0, 10.0)) if ph["thrombus"] else 0.0,
        rv_edv_target_ml=ph["rvedv_i"] * bsa,
        rvef_target=ph["rvef"],
        rv_wall_mm=ph["rv_wall"],
        la_volume_target_ml=ph["la_i"] * bsa,
        ra_volume_target_ml=ph["ra_i"] * bsa,
        effusion_mm=ph["effusion"],
        epicardial_fat_mm=float(rng.uniform(1.8, 4.0)),
        noise_sigma=float(rng.uniform(*site.noise_sigma)),
        bias_strength=float(rng.uniform(*site.bias_strength)),
        blur_px=float(rng.uniform(0.45, 0.75)),
        signal_gain=float(rng.uniform(700.0, 1500.0)),  # headroom for the coil bias
        pixel_spacing_mm=spacing,
        rows=rows,
        cols=cols,
        vendor_style=style,
        axis_tilt_deg=(float(rng.normal(0, 7)), float(rng.normal(0, 7))),
        axis_roll_deg=float(rng.normal(0, 8)),
        heart_offset_mm=tuple(float(v) for v in rng.normal(0, 8, 3)),
        three_ch_angle_deg=float(rng.uniform(45.0, 60.0)),
        lax_rotation_deg=tuple(float(v) for v in rng.normal(0, 3, 3)),
        view_offsets_mm=tuple(float(v) for v in rng.normal(0, 3, 12)),
        sax_tilt_deg=(float(rng.normal(0, 1.5)), float(rng.normal(0, 1.5))),
        sax_slices=sax_slices,
        sax_spacing_mm=sax_spacing,
        sax_start_mm=float(rng.uniform(-1.0, 1.0)),
        torso_mm=(float(rng.uniform(150, 185)), float(rng.uniform(105, 130))),
        subcutaneous_fat_mm=float(np.clip(4.0 + (patient.bmi - 18.0) * 1.1, 4.0, 35.0)),
        texture_seed=int(rng.integers(2**31 - 1)),
        noise_seed=int(rng.integers(2**31 - 1)),
        slice_thickness_mm=site.slice_thickness_mm,
        myocardium_contrast=site.myocardium_contrast,
    )
