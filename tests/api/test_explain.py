"""The pure functions of "why it matched" (`api/explain.py`): query and report statements
and head predictions -> a verdict per finding, and the report phrases shown as evidence."""

from __future__ import annotations

import pytest

from cmr_search.api.explain import (
    Explainer,
    Said,
    evidence_phrase,
    explain_hit,
    head_labels,
    head_says,
    query_findings,
    report_says,
    verdict,
)
from cmr_search.findings.parse import Statement


@pytest.fixture(scope="module")
def explainer() -> Explainer:
    return Explainer(size=2)


def _verdicts(explainer, query: str, report: str | None, heads: list[dict] = ()) -> dict[str, str]:
    said = explainer.report(report) if report is not None else None
    return {e.finding: e.verdict for e in explain_hit(explainer.query(query), said, list(heads))}


def test_a_report_matches_contradicts_or_differs_in_grade_finding_by_finding(explainer):
    query = "severe LV dilatation without LV thrombus"
    assert _verdicts(explainer, query, "Severely dilated LV. No LV thrombus.") == {
        "lv_dilatation": "match", "lv_thrombus": "match"}
    assert _verdicts(explainer, query, "Mildly dilated left ventricle. Apical LV thrombus.") == {
        "lv_dilatation": "grade_differs", "lv_thrombus": "contradicts"}
    assert _verdicts(explainer, query, "Normal LV size. No pericardial effusion.") == {
        "lv_dilatation": "contradicts", "lv_thrombus": "not_stated"}
    # the other way round: the query asks for a thrombus, the report denies it
    assert _verdicts(explainer, "apical LV thrombus", "No LV thrombus.") == {"lv_thrombus": "contradicts"}
    # a report without a grade neither confirms nor denies the query's grade: a match
    assert _verdicts(explainer, "severe LV dilatation", "The LV is dilated.") == {"lv_dilatation": "match"}


def test_the_explanation_names_what_was_asked_and_what_the_report_says(explainer):
    [dilated, thrombus] = explain_hit(explainer.query("severe LV dilatation, and no LV thrombus"),
                                      explainer.report("Mildly dilated left ventricle. There is an apical LV thrombus."), [])
    assert (dilated.asked, dilated.stated, dilated.asked_grade, dilated.stated_grade) == (
        "severe LV dilatation", "mild LV dilatation", "severe", "mild")
    assert dilated.source == "report" and dilated.evidence == ["Mildly dilated left ventricle"]
    assert (thrombus.asked, thrombus.verdict, thrombus.stated) == ("no LV thrombus", "contradicts", "apical LV thrombus")
    assert thrombus.evidence == ["apical LV thrombus"] and thrombus.asked_grade is None


def test_a_report_that_says_both_is_conflicting_with_the_phrases_of_each_side(explainer):
    [e] = explain_hit(explainer.query("no LV thrombus"), explainer.report("No LV thrombus. There is an apical LV thrombus."), [])
    assert e.verdict == "conflicting" and e.evidence == ["apical LV thrombus"] and e.opposite == ["No LV thrombus"]


@pytest.mark.parametrize(("text", "phrase", "evidence"), [
    ("No LV thrombus.", "LV thrombus", "No LV thrombus"),
    ("There is no evidence of LV thrombus.", "LV thrombus", "no evidence of LV thrombus"),
    ("LV thrombus is not seen in the apex.", "LV thrombus", "LV thrombus is not seen"),
    ("Thrombus absent.", "Thrombus", "Thrombus absent"),
    ("Pericardial effusion, small.", "Pericardial effusion", "Pericardial effusion, small"),
    ("Severely dilated LV (LVEDV 310 ml).", "Severely dilated LV", "Severely dilated LV"),
    # a name, a date or a number between the negation and the phrase is never carried over
    ("Seen by Dr Smith on 12/3, no Smith thrombus.", "thrombus", "thrombus"),
    ("No 2024 LV thrombus.", "LV thrombus", "LV thrombus"),
])
def test_evidence_is_the_matched_phrase_widened_only_to_its_negation_or_grade(explainer, text, phrase, evidence):
    [mention] = [m for m in explainer.parser.parse(text) if text[m.start:m.end] == phrase]
    assert evidence_phrase(text, mention) == evidence


def test_report_says_keeps_each_findings_overall_statement(explainer):
    text = "Severely dilated LV with LVEF 25%. No pericardial effusion."
    said = report_says(text, explainer.parser.parse(text))
    assert said["lv_dilatation"] == Said("lv_dilatation", True, 3, "report", ("Severely dilated LV",))
    assert said["reduced_lvef"].present and said["reduced_lvef"].grade == 3
    assert not said["pericardial_effusion"].present and said["pericardial_effusion"].evidence == ("No pericardial effusion",)


def test_a_query_that_names_a_finding_both_ways_asks_nothing_of_it(explainer):
    assert set(query_findings(explainer.parser.parse("LV thrombus, or no thrombus; severe LV dilatation"))) == {"lv_dilatation"}


def test_verdict_rules():
    asked = Statement("lv_dilatation", True, 3, ("severe LV dilatation",))
    assert verdict(asked, None) == "unknown"
    assert verdict(asked, Said("lv_dilatation", True, 3, "report")) == "match"
    assert verdict(asked, Said("lv_dilatation", True, None, "report")) == "match"
    assert verdict(asked, Said("lv_dilatation", True, 1, "report")) == "grade_differs"
    assert verdict(asked, Said("lv_dilatation", False, None, "report")) == "contradicts"
    assert verdict(asked, Said("lv_dilatation", True, 3, "report", ("a",), ("b",))) == "conflicting"
    denied = Statement("lv_dilatation", False, None, ("LV dilatation",))
    assert verdict(denied, Said("lv_dilatation", False, None, "head h")) == "match"
    assert verdict(denied, Said("lv_dilatation", True, 2, "head h")) == "contradicts"


def _row(head: str, task: str, prediction: dict, positive: dict | None = None) -> dict:
    return {"study_uid": "1.2", "head": head, "task": task, "prediction": prediction, "positive": positive}


def test_head_predictions_say_a_finding_by_its_label_its_grade_or_the_lvef():
    assert head_labels("reduced_lvef") == ("reduced_lvef", "reduced_lvef_grade", "lvef")
    binary = head_says("lv_thrombus", _row("d", "multilabel", {"lv_thrombus": 0.3, "hcm": 0.9}, {"lv_thrombus": True}))
    assert binary == Said("lv_thrombus", True, None, "head d", label="lv_thrombus", probability=0.3)  # the card's threshold
    graded = head_says("lv_dilatation", _row("g", "regression", {"lv_dilatation_grade": 2.4}))
    assert (graded.present, graded.grade, graded.value, graded.source) == (True, 2, 2.4, "head g")
    assert not head_says("lv_dilatation", _row("g", "regression", {"lv_dilatation_grade": 0.3})).present
    lvef = head_says("reduced_lvef", _row("lvef-mil", "regression", {"lvef": 27.0}))
    assert (lvef.present, lvef.grade, lvef.label) == (True, 3, "lvef")
    assert not head_says("reduced_lvef", _row("lvef-mil", "regression", {"lvef": 61.0})).present
    assert head_says("lv_thrombus", _row("lvef-mil", "regression", {"lvef": 61.0})) is None


def test_without_a_report_a_head_answers_and_says_so(explainer):
    asked = explainer.query("severely impaired LV systolic function and no LV thrombus")
    rows = [_row("lvef-mil", "regression", {"lvef": 24.0}), _row("b", "binary", {"reduced_lvef": 0.9}, {"reduced_lvef": True})]
    [ef, thrombus] = explain_hit(asked, None, rows)
    # the query has a grade: the head that gives one answers
    assert (ef.verdict, ef.source, ef.value, ef.stated_grade) == ("match", "head lvef-mil", 24.0, "severe")
    assert (thrombus.verdict, thrombus.source, thrombus.stated) == ("unknown", None, None)
    [ef] = explain_hit(explainer.query("impaired LV systolic function"), None, rows)
    assert (ef.source, ef.probability) == ("head b", 0.9)
    [ef] = explain_hit(explainer.query("normal LV systolic function"), None, rows[:1])
    assert ef.verdict == "contradicts"


def test_explain_reads_reports_for_all_hits_and_heads_only_for_those_without_one(explainer):
    asked = explainer.query("no LV thrombus")
    calls = []

    def predict(uids, labels):
        calls.append((uids, labels))
        return {"c": [_row("d", "binary", {"lv_thrombus": 0.8}, {"lv_thrombus": True})]}

    out = explainer.explain(asked, ["a", "b", "c"], lambda uids: {"a": "No LV thrombus.", "b": "Normal LV size."}, predict)
    assert [[e.verdict for e in hit] for hit in out] == [["match"], ["not_stated"], ["contradicts"]]
    assert calls == [(["c"], {"lv_thrombus", "lv_thrombus_grade"})]
    assert explainer.explain({}, ["a"], lambda uids: 1 / 0, predict) == [[]]  # nothing asked: nothing read


def test_parsed_reports_are_cached_by_text_and_bounded(explainer):
    first = explainer.report("No LV thrombus.")
    assert explainer.report("No LV thrombus.") is first
    explainer.report("Normal LV size.")
    explainer.report("Severely dilated LV.")
    assert len(explainer._parsed) == 2 and "No LV thrombus." not in explainer._parsed
