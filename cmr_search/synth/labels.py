"""Phenotype labels of a study, from its parameters and the phantom's true volumes.

Thresholds follow adult CMR reference ranges (upper limits of normal for
BSA-indexed volumes by sex, in the spirit of Kawel-Boehm et al., JCMR 2020) and
are listed in docs/synth.md; every binary label is a pure function of the
numeric columns written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmr_search.synth.params import StudyParams
from cmr_search.synth.phantom import Volumes


@dataclass(frozen=True)
class Thresholds:
    """Clinical cut-offs used for the binary labels."""

    lvedv_index_uln: tuple[float, float] = (105.0, 96.0)  # ml/m2, (male, female)
    rvedv_index_uln: tuple[float, float] = (121.0, 112.0)
    dilatation_grade_factors: tuple[float, float, float] = (1.0, 1.2, 1.4)  # x ULN
    reduced_lvef: float = 40.0  # percent, lvef < this
    dcm_lvef: float = 45.0
    hcm_septum_mm: float = 15.0
    hcm_ratio: float = 1.3
    lvh_wall_mm: tuple[float, float] = (12.0, 11.0)
    rv_dysfunction_rvef: float = 45.0
    la_index_uln: float = 50.0  # ml/m2, maximal LA volume
    ra_index_uln: float = 55.0
    effusion_mm: float = 5.0


THRESHOLDS = Thresholds()

LABEL_COLUMNS = (
    "lvef", "lvedv_ml", "lvesv_ml", "lv_mass_g", "rvedv_ml", "rvesv_ml", "rvef",
    "la_volume_ml", "ra_volume_ml", "septal_thickness_mm", "lateral_thickness_mm",
    "effusion_mm", "heart_rate_bpm", "bsa_m2", "age", "sex", "lv_dilatation_grade",
    "lv_dilatation", "reduced_lvef", "hcm", "concentric_lvh", "dcm", "lv_thrombus",
    "apical_akinesis", "rv_dilatation", "rv_dysfunction", "la_dilatation", "ra_dilatation",
    "pericardial_effusion",
)
BINARY_LABELS = LABEL_COLUMNS[LABEL_COLUMNS.index("lv_dilatation"):]


def dilatation_grade(edv_index: float, sex: str, t: Thresholds = THRESHOLDS) -> int:
    """0 none, 1 mild, 2 moderate, 3 severe: indexed LVEDV against sex-specific ULN."""
    uln = t.lvedv_index_uln[0 if sex == "M" else 1]
    return sum(edv_index > uln * f for f in t.dilatation_grade_factors)


def study_labels(params: StudyParams, vol: Volumes, t: Thresholds = THRESHOLDS) -> dict:
    """All label columns of one study (numbers rounded as written to labels.csv)."""
    # every label uses the rounded numbers written beside it, so it can be recomputed
    male = params.sex == "M"
    bsa = round(params.bsa_m2, 2)
    lvef = round(vol.lvef, 1)
    septal, lateral = round(vol.septal_mm, 1), round(vol.lateral_mm, 1)
    lvedv = round(vol.lvedv_ml, 1)
    grade = dilatation_grade(lvedv / bsa, params.sex, t)
    rvedv, rvef = round(vol.rvedv_ml, 1), round(vol.rvef, 1)
    la, ra = round(vol.la_max_ml, 1), round(vol.ra_max_ml, 1)
    effusion = round(params.effusion_mm, 1)
    hcm = septal >= t.hcm_septum_mm and septal / lateral >= t.hcm_ratio
    lvh_cut = t.lvh_wall_mm[0 if male else 1]
    out = {
        "lvef": lvef,
        "lvedv_ml": lvedv,
        "lvesv_ml": round(vol.lvesv_ml, 1),
        "lv_mass_g": round(vol.lv_mass_g, 1),
        "rvedv_ml": rvedv,
        "rvesv_ml": round(vol.rvesv_ml, 1),
        "rvef": rvef,
        "la_volume_ml": la,
        "ra_volume_ml": ra,
        "septal_thickness_mm": septal,
        "lateral_thickness_mm": lateral,
        "effusion_mm": effusion,
        "heart_rate_bpm": round(params.heart_rate_bpm),
        "bsa_m2": bsa,
        "age": int(params.age),
        "sex": params.sex,
        "lv_dilatation_grade": grade,
        "lv_dilatation": int(grade >= 1),
        "reduced_lvef": int(lvef < t.reduced_lvef),
        "hcm": int(hcm),
        "concentric_lvh": int(not hcm and min(septal, lateral) >= lvh_cut),
        "dcm": int(grade >= 1 and lvef < t.dcm_lvef and not params.apical_akinesis),
        "lv_thrombus": int(params.thrombus),
        "apical_akinesis": int(params.apical_akinesis),
        "rv_dilatation": int(rvedv / bsa > t.rvedv_index_uln[0 if male else 1]),
        "rv_dysfunction": int(rvef < t.rv_dysfunction_rvef),
        "la_dilatation": int(la / bsa > t.la_index_uln),
        "ra_dilatation": int(ra / bsa > t.ra_index_uln),
        "pericardial_effusion": int(effusion >= t.effusion_mm),
    }
    assert tuple(out) == LABEL_COLUMNS
    return out
