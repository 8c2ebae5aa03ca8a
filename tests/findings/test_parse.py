"""The findings parser against what the synthetic generator knows it wrote, and against
report phrasing the generator never uses."""

from __future__ import annotations

import numpy as np
import pytest

from cmr_search.findings.lexicon import FINDINGS, TERMS, expand
from cmr_search.findings.parse import FindingParser, ef_grade, summarise
from cmr_search.synth.labels import study_labels
from cmr_search.synth.params import sample_study_params
from cmr_search.synth.phantom import build_phantom
from cmr_search.synth.reports import write_report


@pytest.fixture(scope="module")
def parser() -> FindingParser:
    return FindingParser()


@pytest.fixture(scope="module")
def cohort_reports():
    out = []
    for k in range(120):
        params = sample_study_params(np.random.default_rng([11, k]), study_index=k)
        labels = study_labels(params, build_phantom(params).volumes)
        out.append((labels, write_report(labels, params, np.random.default_rng([12, k]))))
    return out


def _truth_grade(finding: str, labels: dict) -> int | None:
    if finding == "lv_dilatation":
        return int(labels["lv_dilatation_grade"])
    if finding == "reduced_lvef":
        return ef_grade(labels["lvef"])
    if finding == "pericardial_effusion":
        mm = labels["effusion_mm"]
        return 1 if mm < 10 else 2 if mm < 20 else 3
    return None


def test_every_stated_finding_is_found_with_its_negation(parser, cohort_reports):
    parsed = parser.parse_many([r.text for _, r in cohort_reports])
    stated = wrong = extra = whole_study = 0
    for (labels, report), mentions in zip(cohort_reports, parsed):
        said = summarise(mentions)
        for finding, present in report.mentions:
            stated += 1
            wrong += finding not in said or said[finding].present != present
        for finding, st in said.items():
            # "mildly impaired" (LVEF 40-50) is impaired function below the label's cut-off
            mild_lvef = finding == "reduced_lvef" and st.present and st.grade == 1
            if st.evidence == ("Normal study",):  # denies every finding: the labels must agree
                whole_study += 1
                assert not st.present and not labels.get(finding), (finding, report.text)
            elif finding not in dict(report.mentions) and finding not in report.omitted and not mild_lvef:
                extra += 1
    assert stated > 500
    assert wrong / stated <= 0.01, wrong
    assert extra / stated <= 0.02, extra
    assert whole_study > 50


def test_grades_match_the_labels(parser, cohort_reports):
    checked = right = 0
    for labels, report in cohort_reports:
        said = summarise(parser.parse(report.text))
        for finding in ("lv_dilatation", "reduced_lvef", "pericardial_effusion"):
            st = said.get(finding)
            if st is not None and st.present and st.grade is not None:
                checked += 1
                right += st.grade == _truth_grade(finding, labels)
    assert checked > 30
    assert right == checked


# (text, {finding: (present, grade)}) in wording our generator does not write
PHRASES = [
    ("No evidence of intracardiac thrombus.", {"lv_thrombus": (False, None)}),
    ("LV thrombus is absent.", {"lv_thrombus": (False, None)}),
    ("A laminated apical clot is seen.", {"lv_thrombus": (True, None)}),
    ("The LV cavity is not dilated.", {"lv_dilatation": (False, None)}),
    ("Markedly enlarged left ventricle.", {"lv_dilatation": (True, 3)}),
    ("Mild to moderate left ventricular dilatation.", {"lv_dilatation": (True, 2)}),
    ("Left ventricular ejection fraction is estimated at 33 %.", {"reduced_lvef": (True, 2)}),
    ("EF 62%.", {"reduced_lvef": (False, None)}),
    ("Moderately reduced left ventricular systolic function.", {"reduced_lvef": (True, 2)}),
    ("There is a large circumferential pericardial effusion.", {"pericardial_effusion": (True, 3)}),
    ("No pericardial effusion or LV thrombus.",
     {"pericardial_effusion": (False, None), "lv_thrombus": (False, None)}),
    ("No LV dilatation, with severely impaired systolic function.",
     {"lv_dilatation": (False, None), "reduced_lvef": (True, 3)}),
    ("Normal biventricular size and systolic function.", {"reduced_lvef": (False, None)}),
    ("The right ventricle appears mildly enlarged.", {"rv_dilatation": (True, 1)}),
    ("Akinetic LV apex.", {"apical_akinesis": (True, None)}),
    ("Normal regional wall motion.", {"apical_akinesis": (False, None)}),
    ("Asymmetric septal hypertrophy in keeping with HCM.", {"hcm": (True, None)}),
    ("Without left ventricular hypertrophy.", {"hcm": (False, None), "concentric_lvh": (False, None)}),
    # query phrasings: a denial does not reach past "and", nor over a finding given a grade
    ("no thrombus and severe LV dilatation", {"lv_thrombus": (False, None), "lv_dilatation": (True, 3)}),
    ("no LV thrombus, severely dilated LV", {"lv_thrombus": (False, None), "lv_dilatation": (True, 3)}),
    ("LVEF below 35%", {"reduced_lvef": (True, 2)}),
    ("EF < 40%", {"reduced_lvef": (True, 2)}),
    ("LV not dilated", {"lv_dilatation": (False, None)}),
    ("normal LV", {"lv_dilatation": (False, None), "reduced_lvef": (False, None)}),
    # paraphrases: uncertainty is not denial, another chamber's thrombus is not the LV's
    ("Thrombus cannot be excluded.", {"lv_thrombus": (True, None)}),
    ("Left atrial appendage thrombus, no LV thrombus.", {"lv_thrombus": (False, None)}),
    ("Ejection fraction of 35 percent", {"reduced_lvef": (True, 2)}),
    ("LV of normal size.", {"lv_dilatation": (False, None)}),
    ("LV end-diastolic volume is increased.", {"lv_dilatation": (True, None)}),
    ("Global hypokinesis.", {"reduced_lvef": (True, None)}),
    ("RV hypokinesis.", {"rv_dysfunction": (True, None)}),
    ("Normal RV.", {"rv_dilatation": (False, None), "rv_dysfunction": (False, None)}),
    ("Normal RV size.", {"rv_dilatation": (False, None)}),
    ("Hypertrophied septum.", {"hcm": (True, None)}),
    ("Apical ballooning.", {"apical_akinesis": (True, None)}),
    ("Dilated right heart.", {"rv_dilatation": (True, None), "ra_dilatation": (True, None)}),
    ("Structurally normal heart.", {name: (False, None) for name in FINDINGS}),
]


@pytest.mark.parametrize(("text", "expected"), PHRASES, ids=[t for t, _ in PHRASES])
def test_clinical_phrasings(parser, text, expected):
    said = {k: (v.present, v.grade) for k, v in summarise(parser.parse(text)).items()}
    for finding, value in expected.items():
        assert said.get(finding) == value, said


@pytest.mark.parametrize("text", ["Thrombus in the left atrial appendage.", "LA appendage clot."])
def test_a_thrombus_outside_the_lv_names_no_finding(parser, text):
    assert parser.parse(text) == []


def test_normal_rv_size_says_nothing_of_its_function(parser):
    assert set(summarise(parser.parse("Normal RV size."))) == {"rv_dilatation"}


def test_mentions_carry_spans_and_cues(parser):
    text = "Severely dilated LV. No LV thrombus."
    dil, thr = parser.parse(text)
    assert text[dil.start:dil.end] == "Severely dilated LV" and text[slice(*dil.cue)] == "Severely"
    assert (dil.finding, dil.negated, dil.grade, dil.sentence) == ("lv_dilatation", False, 3, 0)
    assert (thr.finding, thr.negated, thr.sentence) == ("lv_thrombus", True, 1)
    assert parser.sentences(text) == [(0, 20), (21, 36)]


def test_a_report_that_says_both_is_marked(parser):
    said = summarise(parser.parse("No LV dilatation. Impression: mildly dilated LV."))
    st = said["lv_dilatation"]
    assert st.present and st.grade == 1 and st.conflicting


def test_lexicon_is_consistent():
    names = {n for t in TERMS for n in t.findings}
    assert names == set(FINDINGS)
    for term in TERMS:
        assert set(term.asserted or ()) <= set(term.findings)
        for template in term.templates:
            assert expand(template), template


def test_no_two_terms_share_a_pattern():
    # the entity ruler keeps one label per span: a shared pattern would lose a finding
    import json

    owner: dict[str, int] = {}
    for i, term in enumerate(TERMS):
        for template in term.templates:
            for pattern in expand(template):
                key = json.dumps(pattern, sort_keys=True)
                assert owner.setdefault(key, i) == i, template


@pytest.mark.parametrize("claim, report, expected", [
    ("Severe LV dilatation.", "Severely dilated LV. No LV thrombus.", 1),
    ("No LV thrombus.", "Severely dilated LV. No LV thrombus.", 1),
    ("No LV thrombus.", "Apical LV thrombus is seen.", 0),
    ("Mild LV dilatation.", "Severely dilated left ventricle.", 0),
    ("The LV is dilated.", "Severely dilated left ventricle.", 1),  # no grade asked: any grade bears it out
    ("Severe LV dilatation.", "The LV is dilated.", -1),  # the report gives no grade to compare
    ("Small pericardial effusion.", "Normal LV size.", -1),  # the report is silent on it
    ("Dilated LV with apical thrombus.", "Severely dilated LV. No LV thrombus.", 0),  # one finding contradicts
    ("Dilated LV with apical thrombus.", "Dilated LV.", -1),  # one agrees, one unknown
    ("Right ventricular outflow tract.", "Dilated LV.", -1),  # names no finding
    ("Normal study.", "Dilated LV.", 0),  # denies every finding
])
def test_agreement_of_a_claim_with_a_report(parser, claim, report, expected):
    from cmr_search.findings.parse import agreement

    assert agreement(summarise(parser.parse(claim)), summarise(parser.parse(report))) == expected


def test_the_memo_of_readings_changes_no_result_and_stays_bounded():
    texts = ["No LV thrombus.", "Severe LV dilatation. EF 25%.", "No LV thrombus.", "Normal study."]
    fresh = [FindingParser(memo_size=0).read_many([t])[0] for t in texts]
    memo = FindingParser(memo_size=3)
    assert memo.read_many(texts) == fresh and len(memo._memo) == 3
    first = memo.read_many(texts[:1])[0]
    first[0].clear()  # a caller's list is its own: the memo keeps what was read
    assert memo.read_many(texts) == fresh
    memo.read_many(["Mild pericardial effusion."])  # a fourth text starts a new memo
    assert len(memo._memo) == 1
