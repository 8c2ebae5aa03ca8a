"""Free-text CMR reports in another hospital's house style: a narrative report in
CLINICAL DETAILS / TECHNIQUE / FINDINGS / IMPRESSION sections.

The external site profile (``synth/site.py``) writes these instead of
``reports.write_report``, so that a model trained on the default cohort's reports meets
other wording: "increased cavity size", "EF estimated at NN%", "no intracavitary thrombus
identified", "Structurally normal heart". The contract is write_report's: every finding is
stated present (with its grade), denied, or left unsaid; a share of reports leaves one
present finding out; ``Report.mentions`` and ``Report.omitted`` say what the text asserts.
Every phrase here is one the findings lexicon (``findings/lexicon.py``) reads, with one
finding per clause, so a denial's scope never reaches an asserted finding.
"""

from __future__ import annotations

import math

import numpy as np

from cmr_search.synth.params import StudyParams
from cmr_search.synth.reports import ADV, FINDINGS, OMISSION_RATE, Report, _ef_grade, _effusion_size

__all__ = ["write_narrative_report"]

_INDICATIONS = ("Breathlessness on exertion.", "Palpitations.", "Abnormal ECG.",
                "Chest pain, assessment of cardiac structure.", "Syncope.",
                "Murmur on auscultation.")


def write_narrative_report(labels: dict, params: StudyParams, rng: np.random.Generator, *,
                           field_strength_t: float | None = 3.0) -> Report:
    """Compose one study's narrative report from its labels (and a few raw parameters).

    Findings come in anatomical order (LV, wall, regional, RV, atria, pericardium), not
    shuffled as in write_report, and an IMPRESSION always closes the report. The
    technique paragraph names the site's field strength (none when it is None).
    """
    def pick(options):
        return options[int(rng.integers(len(options)))]

    present = [f for f in FINDINGS if labels[f]]
    omitted: tuple[str, ...] = ()
    if present and rng.random() < OMISSION_RATE:
        omitted = (pick(present),)
    say = {f: bool(labels[f]) and f not in omitted for f in FINDINGS}
    mentions: list[tuple[str, bool]] = []
    body: list[str] = []
    unit = pick(["mL/m²", "mL/m2"])
    bsa = labels["bsa_m2"]
    edv, ef = labels["lvedv_ml"], labels["lvef"]
    edvi = round(edv / bsa)
    grade = labels["lv_dilatation_grade"]
    efg = _ef_grade(ef)
    # rounding down keeps the stated EF in the label's band: 49.7 % is not written "50%"
    ef_text = f"EF estimated at {math.floor(ef)}%"

    # left ventricular size and global function
    size = None
    if say["lv_dilatation"]:
        mentions.append(("lv_dilatation", True))
        adv = ADV[grade]
        size = pick([
            f"The left ventricular cavity is {adv} enlarged (LVEDV {edv:.0f} mL, indexed {edvi} {unit})",
            f"{adv.capitalize()} increased left ventricular cavity size (indexed EDV {edvi} {unit})",
            f"LV end-diastolic volume is {adv} increased at {edvi} {unit}",
        ])
    elif not labels["lv_dilatation"] and rng.random() < 0.7:
        mentions.append(("lv_dilatation", False))
        size = pick([f"The left ventricle is of normal size (indexed EDV {edvi} {unit})",
                     f"Non-dilated left ventricle (LVEDV {edv:.0f} mL)",
                     "Left ventricular cavity size is within normal limits"])
    state = None  # how the LV contracts, when the report says so
    if say["reduced_lvef"] or not labels["reduced_lvef"]:
        if efg == 0:
            state = pick(["normal", "preserved"])
            mentions.append(("reduced_lvef", False))
        else:
            # "mildly impaired" (EF 40-50 %) is said but is not the label, as in write_report
            state = pick([f"{ADV[efg]} impaired", f"{ADV[efg]} reduced"]
                         + (["poor"] if efg == 3 else []))
            if labels["reduced_lvef"]:
                mentions.append(("reduced_lvef", True))
    if size and state and rng.random() < 0.5:
        body.append(f"{size}, with {state} systolic function ({ef_text}).")
    else:
        if size:
            body.append(size + ".")
        if state:
            body.append(pick([f"Left ventricular systolic function is {state} ({ef_text}).",
                              f"{state.capitalize()} global systolic function ({ef_text})."]))
    if rng.random() < 0.4:
        body.append(f"Left ventricular mass {labels['lv_mass_g']:.0f} g, end-systolic volume "
                    f"{labels['lvesv_ml']:.0f} mL.")

    # wall thickness
    sep, lat = labels["septal_thickness_mm"], labels["lateral_thickness_mm"]
    if say["hcm"]:
        mentions.append(("hcm", True))
        body.append(pick([
            (f"Asymmetric hypertrophy of the interventricular septum measuring {sep} mm "
             f"(lateral wall {lat} mm), consistent with hypertrophic cardiomyopathy."),
            (f"The basal interventricular septum is thickened to {sep} mm, in keeping with a "
             "hypertrophic cardiomyopathy phenotype."),
        ]))
    elif say["concentric_lvh"]:
        mentions.append(("concentric_lvh", True))
        body.append(pick([
            f"Concentric left ventricular hypertrophy, maximal wall thickness {max(sep, lat)} mm.",
            f"Symmetrically thickened LV walls (septum {sep} mm, lateral wall {lat} mm).",
        ]))
    elif not labels["hcm"] and not labels["concentric_lvh"] and rng.random() < 0.6:
        mentions += [("hcm", False), ("concentric_lvh", False)]
        body.append(pick([f"Wall thickness is normal (septum {sep} mm).",
                          "No left ventricular hypertrophy identified.",
                          f"Normal myocardial thickness, septum {sep} mm."]))

    # regional function and thrombus
    if say["apical_akinesis"]:
        mentions.append(("apical_akinesis", True))
        body.append(pick(["Akinetic apical segments.",
                          "Akinesia of the left ventricular apex."]))
    elif not labels["apical_akinesis"] and rng.random() < 0.4:
        mentions.append(("apical_akinesis", False))
        body.append(pick(["Regional wall motion is normal.",
                          "No regional wall motion abnormality identified."]))
    size_mm = round(2 * params.thrombus_radius_mm)
    if say["lv_thrombus"]:
        mentions.append(("lv_thrombus", True))
        body.append(pick([f"A {size_mm} mm thrombus is identified in the left ventricular apex.",
                          f"Laminated apical thrombus measuring {size_mm} mm."]))
    elif not labels["lv_thrombus"] and rng.random() < (0.8 if labels["apical_akinesis"] else 0.4):
        mentions.append(("lv_thrombus", False))
        body.append(pick(["No intracavitary thrombus identified.",
                          "There is no evidence of left ventricular thrombus."]))

    # right heart
    rvedvi = round(labels["rvedv_ml"] / bsa)
    rvef = labels["rvef"]
    if say["rv_dilatation"]:
        mentions.append(("rv_dilatation", True))
        body.append(pick([f"Increased right ventricular cavity size (RVEDV index {rvedvi} {unit}).",
                          "The right ventricle is enlarged."]))
    elif not labels["rv_dilatation"] and rng.random() < 0.5:
        mentions.append(("rv_dilatation", False))
        body.append(pick(["Right ventricular size is normal.", "Non-dilated right ventricle."]))
    if say["rv_dysfunction"]:
        mentions.append(("rv_dysfunction", True))
        sev = "severely" if rvef < 30 else "moderately" if rvef < 38 else "mildly"
        body.append(pick([f"Right ventricular systolic function is {sev} impaired (RVEF {rvef:.0f}%).",
                          f"Reduced right ventricular systolic performance, RVEF {rvef:.0f}%."]))
    elif not labels["rv_dysfunction"] and rng.random() < 0.5:
        mentions.append(("rv_dysfunction", False))
        body.append(pick(["Normal right ventricular systolic function.",
                          f"Preserved right ventricular systolic performance (RVEF {rvef:.0f}%)."]))

    # atria
    lai = round(labels["la_volume_ml"] / bsa)
    if say["la_dilatation"] and say["ra_dilatation"] and rng.random() < 0.5:
        mentions += [("la_dilatation", True), ("ra_dilatation", True)]
        body.append("Biatrial enlargement.")
    else:
        if say["la_dilatation"]:
            mentions.append(("la_dilatation", True))
            la = labels["la_volume_ml"]
            body.append(pick([f"The left atrium is enlarged ({la:.0f} mL, indexed {lai} {unit}).",
                              "Left atrial enlargement."]))
        if say["ra_dilatation"]:
            mentions.append(("ra_dilatation", True))
            body.append(pick(["The right atrium is enlarged.", "Right atrial enlargement."]))
    if not labels["la_dilatation"] and not labels["ra_dilatation"] and rng.random() < 0.5:
        mentions += [("la_dilatation", False), ("ra_dilatation", False)]
        body.append(pick(["The atria are normal in size.", "Normal biatrial size."]))

    # pericardium
    eff = labels["effusion_mm"]
    if say["pericardial_effusion"]:
        mentions.append(("pericardial_effusion", True))
        size_word = _effusion_size(eff)
        body.append(pick([
            f"A {size_word} pericardial effusion is present, measuring up to {eff:.0f} mm.",
            f"{size_word.capitalize()} pericardial effusion with a maximal depth of {eff:.0f} mm.",
        ]))
    elif not labels["pericardial_effusion"] and rng.random() < 0.5:
        mentions.append(("pericardial_effusion", False))
        body.append(pick(["No pericardial effusion identified.",
                          "The pericardium is unremarkable, with no effusion."]))

    sections = []
    if rng.random() < 0.7:
        sections.append("CLINICAL DETAILS: " + pick(_INDICATIONS))
    if rng.random() < 0.8:
        field = f"{field_strength_t:.1f} T cine" if field_strength_t else "Cine"
        sections.append(f"TECHNIQUE: {field} SSFP imaging in the long-axis planes and a "
                        "contiguous short-axis stack.")
    if params.visit_index > 0 and rng.random() < 0.7:
        sections.append("COMPARISON: Previous CMR at this centre.")
    sections.append("FINDINGS: " + " ".join(body) if body else "FINDINGS: As below.")
    sections.append("IMPRESSION: " + _impression(labels, say, grade, efg, ef_text))
    if say["dcm"]:
        mentions.append(("dcm", True))
    return Report(" ".join(sections), tuple(mentions), omitted)


def _impression(labels: dict, say: dict, grade: int, efg: int, ef_text: str) -> str:
    """The IMPRESSION: stated findings joined by semicolons (each its own clause)."""
    parts = []
    if say["dcm"]:
        parts.append("dilated cardiomyopathy phenotype")
    elif say["lv_dilatation"]:
        parts.append(f"{ADV[grade]} dilated left ventricle")
    if say["reduced_lvef"]:
        parts.append(f"{ADV[efg]} impaired left ventricular systolic function")
    if say["hcm"]:
        parts.append("hypertrophic cardiomyopathy")
    if say["concentric_lvh"]:
        parts.append("concentric left ventricular hypertrophy")
    if say["apical_akinesis"]:
        parts.append("apical akinesis")
    if say["lv_thrombus"]:
        parts.append("apical left ventricular thrombus")
    if say["rv_dilatation"] and say["rv_dysfunction"]:
        parts.append("right ventricular dilatation and dysfunction")
    elif say["rv_dilatation"]:
        parts.append("right ventricular dilatation")
    elif say["rv_dysfunction"]:
        parts.append("impaired right ventricular function")
    if say["la_dilatation"] and say["ra_dilatation"]:
        parts.append("biatrial enlargement")
    elif say["la_dilatation"] or say["ra_dilatation"]:
        parts.append(("left" if say["la_dilatation"] else "right") + " atrial enlargement")
    if say["pericardial_effusion"]:
        parts.append(f"{_effusion_size(labels['effusion_mm'])} pericardial effusion")
    if parts:
        text = "; ".join(parts)
        return text[0].upper() + text[1:] + "."
    if any(labels[f] for f in FINDINGS):
        return "Findings as detailed above."
    if efg > 0:  # EF 40-50 %: below normal but not the reduced-LVEF label
        return f"Mildly impaired left ventricular systolic function ({ef_text})."
    return "Structurally normal heart."
