"""Free-text CMR reports written from a study's labels, with varied phrasing.

Every finding is stated positively (with severity and measurements), negated
("No LV thrombus."), or left unsaid; a share of reports omits one finding that
is present, as real reports do. The structured `mentions` and `omitted` fields
say what the text asserts, so tests can check the text against the labels.
Negations always start their sentence with "No" or "There is no".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmr_search.synth.params import StudyParams

FINDINGS = (
    "lv_dilatation", "reduced_lvef", "hcm", "concentric_lvh", "dcm", "lv_thrombus",
    "apical_akinesis", "rv_dilatation", "rv_dysfunction", "la_dilatation", "ra_dilatation",
    "pericardial_effusion",
)
OMISSION_RATE = 0.13
ADJ = {1: "mild", 2: "moderate", 3: "severe"}
ADV = {1: "mildly", 2: "moderately", 3: "severely"}


@dataclass(frozen=True)
class Report:
    """A report's text and what it asserts about each finding."""

    text: str
    mentions: tuple[tuple[str, bool], ...]  # (finding, present) stated in the text
    omitted: tuple[str, ...]  # present findings the text leaves out


def _ef_grade(ef: float) -> int:
    return 0 if ef >= 50 else 1 if ef >= 40 else 2 if ef >= 30 else 3


def _effusion_size(mm: float) -> str:
    return "small" if mm < 10 else "moderate" if mm < 20 else "large"


def write_report(labels: dict, params: StudyParams, rng: np.random.Generator) -> Report:
    """Compose the report of one study from its labels (and a few raw parameters)."""
    def pick(options):
        return options[int(rng.integers(len(options)))]

    present = [f for f in FINDINGS if labels[f]]
    omitted = ()
    if present and rng.random() < OMISSION_RATE:
        omitted = (pick(present),)
    say = {f: bool(labels[f]) and f not in omitted for f in FINDINGS}
    mentions: list[tuple[str, bool]] = []
    body: list[str] = []
    unit = pick(["ml/m2", "mL/m²", "ml/m²"])
    bsa = labels["bsa_m2"]
    edv, esv, ef = labels["lvedv_ml"], labels["lvesv_ml"], labels["lvef"]
    edvi = round(edv / bsa)
    grade = labels["lv_dilatation_grade"]
    efg = _ef_grade(ef)
    func = {0: pick(["normal", "preserved"]), 1: "mildly impaired",
            2: pick(["moderately impaired", "moderately reduced"]),
            3: pick(["severely impaired", "severely reduced", "poor"])}[efg]

    # left ventricular size and global function
    if say["lv_dilatation"]:
        mentions.append(("lv_dilatation", True))
        sev_adj, sev_adv = ADJ[grade], ADV[grade]
        size = pick([
            f"The left ventricle is {sev_adv} dilated (LVEDV {edv:.0f} ml, {edvi} {unit})",
            f"{sev_adj.capitalize()} LV dilatation (indexed EDV {edvi} {unit})",
            f"{sev_adj.capitalize()}ly dilated left ventricle, LVEDV {edv:.0f} ml ({edvi} {unit})",
            f"The LV is {sev_adv} enlarged with an indexed EDV of {edvi} {unit}",
        ])
    elif labels["lv_dilatation"]:
        size = None  # omitted: say nothing about the size
    else:
        if rng.random() < 0.7:
            mentions.append(("lv_dilatation", False))
            size = pick([f"Normal LV size (LVEDV {edv:.0f} ml, {edvi} {unit})",
                         f"The left ventricle is not dilated (EDV {edvi} {unit})",
                         "LV cavity size is normal"])
        else:
            size = None
    function = None
    if say["reduced_lvef"] or not labels["reduced_lvef"]:
        function = pick([f"{func} systolic function (LVEF {ef:.0f}%)",
                         f"{func} global systolic function with an EF of {ef:.0f}%",
                         f"LVEF {ef:.0f}% ({func})"])
        if labels["reduced_lvef"]:
            mentions.append(("reduced_lvef", True))
        elif efg == 0:
            mentions.append(("reduced_lvef", False))
    if size and function and rng.random() < 0.6:
        body.append(f"{size}, with {function}.")
    else:
        if size:
            body.append(size + ".")
        if function:
            body.append(function[0].upper() + function[1:] + ".")
    if rng.random() < 0.5:
        body.append(f"LVESV {esv:.0f} ml, LV mass {labels['lv_mass_g']:.0f} g.")

    # wall thickness
    sep, lat = labels["septal_thickness_mm"], labels["lateral_thickness_mm"]
    if say["hcm"]:
        mentions.append(("hcm", True))
        body.append(pick([
            (f"Asymmetric septal hypertrophy, maximal septal thickness {sep} mm versus {lat} mm "
             "laterally, consistent with hypertrophic cardiomyopathy."),
            f"Hypertrophic cardiomyopathy phenotype with asymmetric septal hypertrophy ({sep} mm).",
            (f"Marked asymmetric hypertrophy of the interventricular septum ({sep} mm; septal "
             f"to lateral ratio {sep / lat:.1f}), in keeping with HCM."),
        ]))
    elif say["concentric_lvh"]:
        mentions.append(("concentric_lvh", True))
        body.append(pick([
            f"Concentric left ventricular hypertrophy (septum {sep} mm, lateral wall {lat} mm).",
            f"Concentric LVH with a maximal wall thickness of {max(sep, lat)} mm.",
            f"Increased wall thickness in a concentric pattern (septum {sep} mm).",
        ]))
    elif not labels["hcm"] and not labels["concentric_lvh"] and rng.random() < 0.6:
        mentions += [("hcm", False), ("concentric_lvh", False)]
        body.append(pick([f"Normal wall thickness (septum {sep} mm).",
                          "No LV hypertrophy.",
                          f"There is no left ventricular hypertrophy (septum {sep} mm)."]))

    # regional function and thrombus
    if say["apical_akinesis"]:
        mentions.append(("apical_akinesis", True))
        body.append(pick(["Akinesia of the apical segments.",
                          "Apical akinesis with preserved contraction of the basal segments.",
                          "Regional wall motion abnormality: the LV apex is akinetic.",
                          "The apical segments are akinetic."]))
    elif not labels["apical_akinesis"] and rng.random() < 0.4:
        mentions.append(("apical_akinesis", False))
        body.append(pick(["No regional wall motion abnormality.",
                          "No regional wall motion abnormality is seen."]))
    size_mm = round(2 * params.thrombus_radius_mm)
    if say["lv_thrombus"]:
        mentions.append(("lv_thrombus", True))
        body.append(pick([
            f"There is an apical LV thrombus measuring {size_mm} mm.",
            f"Apical thrombus in the left ventricular apex ({size_mm} mm).",
            f"A {size_mm} mm mural thrombus is seen in the LV apex.",
            "Apical left ventricular thrombus.",
        ]))
    elif not labels["lv_thrombus"] and rng.random() < (0.8 if labels["apical_akinesis"] else 0.4):
        mentions.append(("lv_thrombus", False))
        body.append(pick(["No LV thrombus.", "No intracavitary thrombus.",
                          "No left ventricular thrombus is seen."]))

    # right heart
    rvedvi = round(labels["rvedv_ml"] / bsa)
    rvef = labels["rvef"]
    if say["rv_dilatation"]:
        mentions.append(("rv_dilatation", True))
        rvedv = labels["rvedv_ml"]
        body.append(pick([f"The right ventricle is dilated (RVEDV {rvedv:.0f} ml, {rvedvi} {unit}).",
                          f"RV dilatation (RVEDVi {rvedvi} {unit}).",
                          "Dilated right ventricle."]))
    elif not labels["rv_dilatation"] and rng.random() < 0.5:
        mentions.append(("rv_dilatation", False))
        body.append(pick(["Normal RV size.", "The right ventricle is not dilated."]))
    if say["rv_dysfunction"]:
        mentions.append(("rv_dysfunction", True))
        sev = "severely" if rvef < 30 else "moderately" if rvef < 38 else "mildly"
        body.append(pick([f"RV systolic function is {sev} impaired (RVEF {rvef:.0f}%).",
                          f"Reduced RV function, RVEF {rvef:.0f}%."]))
    elif not labels["rv_dysfunction"] and rng.random() < 0.5:
        mentions.append(("rv_dysfunction", False))
        body.append(pick([f"Normal RV systolic function (RVEF {rvef:.0f}%).",
                          "Preserved RV function."]))

    # atria
    lai = round(labels["la_volume_ml"] / bsa)
    if say["la_dilatation"]:
        mentions.append(("la_dilatation", True))
        la = labels["la_volume_ml"]
        body.append(pick([f"The left atrium is dilated ({la:.0f} ml, {lai} {unit}).",
                          "LA enlargement.", "Dilated left atrium."]))
    if say["ra_dilatation"]:
        mentions.append(("ra_dilatation", True))
        body.append(pick(["Right atrial dilatation.",
                          f"The right atrium is enlarged ({labels['ra_volume_ml']:.0f} ml)."]))
    if not labels["la_dilatation"] and not labels["ra_dilatation"] and rng.random() < 0.5:
        mentions += [("la_dilatation", False), ("ra_dilatation", False)]
        body.append(pick(["Normal atrial sizes.", "Both atria are normal in size."]))

    # pericardium
    eff = labels["effusion_mm"]
    if say["pericardial_effusion"]:
        mentions.append(("pericardial_effusion", True))
        size = _effusion_size(eff)
        body.append(pick([f"There is a {size} pericardial effusion measuring {eff:.0f} mm.",
                          f"{size.capitalize()} circumferential pericardial effusion ({eff:.0f} mm).",
                          f"Pericardial effusion, {size}, up to {eff:.0f} mm."]))
    elif not labels["pericardial_effusion"] and rng.random() < 0.5:
        mentions.append(("pericardial_effusion", False))
        body.append(pick(["No pericardial effusion.", "No significant pericardial effusion.",
                          "There is no pericardial effusion."]))

    order = rng.permutation(len(body))
    sentences = [body[i] for i in order]
    if rng.random() < 0.45:
        sentences.insert(0, _preamble(params, rng))
    if rng.random() < 0.55:
        sentences.append(_impression(labels, say, grade, efg, rng))
        if say["dcm"]:
            mentions.append(("dcm", True))
    return Report(" ".join(sentences), tuple(mentions), omitted)


def _preamble(params: StudyParams, rng: np.random.Generator) -> str:
    options = [("Technique: cine SSFP imaging in the 4-chamber, 2-chamber and 3-chamber "
                "long-axis planes and a short-axis stack."),
               "Comparison: none.",
               "Indication: assessment of ventricular size and function."]
    if params.visit_index > 0:
        options.append("Comparison: prior CMR of the same patient.")
    return options[int(rng.integers(len(options)))]


def _impression(labels: dict, say: dict, grade: int, efg: int, rng) -> str:
    parts = []
    if say["dcm"]:
        parts.append("appearances in keeping with a dilated cardiomyopathy")
    elif say["lv_dilatation"]:
        parts.append(f"{ADV[grade]} dilated LV")
    if say["reduced_lvef"]:
        parts.append(f"{ADV[efg]} impaired LV systolic function")
    if say["hcm"]:
        parts.append("hypertrophic cardiomyopathy")
    if say["concentric_lvh"]:
        parts.append("concentric LV hypertrophy")
    if say["apical_akinesis"]:
        parts.append("apical akinesis")
    if say["lv_thrombus"]:
        parts.append("apical LV thrombus")
    if say["rv_dilatation"] or say["rv_dysfunction"]:
        parts.append("right ventricular " + " and ".join(
            w for w, f in (("dilatation", "rv_dilatation"), ("dysfunction", "rv_dysfunction"))
            if say[f]))
    if say["pericardial_effusion"]:
        parts.append(f"{_effusion_size(labels['effusion_mm'])} pericardial effusion")
    head = "Impression: " if rng.random() < 0.5 else "Conclusion: "
    if not parts:
        return head + ("Normal study." if not any(labels[f] for f in FINDINGS)
                       else "See findings above.")
    text = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return head + text[0].upper() + text[1:] + "."
