""""Why it matched" through the API: each text-search hit says, per finding of the query,
what the study's stored report states, or for a study without a report, what a head
predicts; the verdicts mark hits and never filter or reorder them."""

from __future__ import annotations

import csv
import json

import pytest
from api_data import copy_api

from cmr_search.findings.parse import ef_grade
from cmr_search.store import ClipStore
from cmr_search.store.clip_store import sql_quote

QUERY = "severe LV dilatation and severely impaired LV systolic function without LV thrombus"
REPORTS = {  # the study's place in the store's uid order -> its report
    0: "Severely dilated LV (LVEDV 310 ml). Apical LV thrombus. LVEF 25%.",
    1: "Mildly dilated left ventricle. No LV thrombus. Normal LV systolic function.",
    2: "Severely dilated LV. No LV thrombus. There is an apical LV thrombus.",
}
NO_REPORT = 3


@pytest.fixture(scope="module")
def known(trained_store, tmp_path_factory):
    """An app over a store copy whose first three studies have the reports above and whose
    fourth has none; (api, study_uids)."""
    handle = copy_api(trained_store, tmp_path_factory.mktemp("explain"))
    store = ClipStore.open(handle.root)
    uids = sorted(store.table_study_uids("reports"))
    path = handle.root.parent / "reports.csv"
    with open(path, "w", newline="") as fp:
        writer = csv.writer(fp)
        writer.writerow(["study_uid", "report"])
        writer.writerows([uids[i], text] for i, text in REPORTS.items())
    assert store.import_reports(path).rows == len(REPORTS)
    store.db.open_table("reports").delete(f"study_uid = '{sql_quote(uids[NO_REPORT])}'")
    with handle.client:
        yield handle, uids


def _search(api, query: str, **extra) -> dict:
    r = api.client.post("/search/text", json={"query": query, "k": 100, **extra}, headers=api.read)
    assert r.status_code == 200, r.text
    return r.json()


def _why(body: dict, uid: str) -> dict[str, dict]:
    [hit] = [h for h in body["hits"] if h["study_uid"] == uid]
    return {e["finding"]: e for e in hit["explanation"]}


def test_the_store_gives_the_reports_of_the_studies_asked_for(known):
    api, uids = known
    reports = ClipStore.open(api.root).reports([uids[0], uids[NO_REPORT], "no-such-study"])
    assert reports == {uids[0]: REPORTS[0]}


def test_the_query_findings_are_listed_with_the_result(known):
    api, _ = known
    body = _search(api, QUERY)
    assert [(f["finding"], f["present"], f["grade"]) for f in body["findings"]] == [
        ("lv_dilatation", True, "severe"), ("reduced_lvef", True, "severe"), ("lv_thrombus", False, None)]
    assert body["findings"][2]["asked"] == "no LV thrombus" and body["findings"][2]["text"] == ["LV thrombus"]


def test_a_report_that_states_the_opposite_is_marked_contradicts_with_its_phrase(known):
    api, uids = known
    why = _why(_search(api, QUERY), uids[0])
    assert [why[f]["verdict"] for f in ("lv_dilatation", "reduced_lvef", "lv_thrombus")] == ["match", "match", "contradicts"]
    assert why["lv_dilatation"]["evidence"] == ["Severely dilated LV"] and why["lv_dilatation"]["source"] == "report"
    assert why["reduced_lvef"]["evidence"] == ["LVEF 25%"] and why["reduced_lvef"]["stated_grade"] == "severe"
    thrombus = why["lv_thrombus"]
    assert (thrombus["asked"], thrombus["stated"], thrombus["evidence"]) == (
        "no LV thrombus", "apical LV thrombus", ["Apical LV thrombus"])
    # and the other way round: a query for a thrombus against a report that denies one
    assert _why(_search(api, "apical LV thrombus"), uids[1])["lv_thrombus"]["verdict"] == "contradicts"


def test_another_grade_a_missing_finding_and_a_report_saying_both_are_told_apart(known):
    api, uids = known
    why = _why(_search(api, QUERY), uids[1])
    dilated = why["lv_dilatation"]
    assert (dilated["verdict"], dilated["asked_grade"], dilated["stated_grade"], dilated["evidence"]) == (
        "grade_differs", "severe", "mild", ["Mildly dilated left ventricle"])
    assert why["reduced_lvef"]["verdict"] == "contradicts" and why["lv_thrombus"]["evidence"] == ["No LV thrombus"]
    assert _why(_search(api, "small pericardial effusion"), uids[1])["pericardial_effusion"]["verdict"] == "not_stated"
    both = _why(_search(api, QUERY), uids[2])["lv_thrombus"]
    assert (both["verdict"], both["evidence"], both["opposite"]) == ("conflicting", ["apical LV thrombus"], ["No LV thrombus"])


def test_without_a_report_the_registered_head_answers_and_is_named(known):
    api, uids = known
    why = _why(_search(api, QUERY), uids[NO_REPORT])
    lvef = next(p for p in api.client.get(f"/studies/{uids[NO_REPORT]}/predictions", headers=api.read).json()["predictions"]
                if p["head"] == "lvef-mil")["prediction"]["lvef"]
    ef = why["reduced_lvef"]
    assert (ef["source"], ef["label"], ef["value"]) == ("head lvef-mil", "lvef", pytest.approx(lvef, abs=1e-4))
    assert ef["verdict"] == ("match" if ef_grade(lvef) == 3 else "grade_differs" if ef_grade(lvef) else "contradicts")
    # no head predicts a dilatation or a thrombus here
    assert {why[f]["verdict"] for f in ("lv_dilatation", "lv_thrombus")} == {"unknown"}
    assert why["lv_thrombus"]["source"] is None and why["lv_thrombus"]["evidence"] == []


def test_verdicts_mark_hits_but_never_filter_or_reorder_them(known):
    api, uids = known
    plain = _search(api, QUERY, explain=False)
    explained = _search(api, QUERY)
    assert [(h["study_uid"], h["score"]) for h in explained["hits"]] == [(h["study_uid"], h["score"]) for h in plain["hits"]]
    assert len(explained["hits"]) == len(uids)  # the contradicting studies are all still there
    assert plain["findings"] == [] and all(h["explanation"] == [] for h in plain["hits"])
    assert all(len(h["explanation"]) == 3 for h in explained["hits"])
    # a filter is only ever the user's own: with one, the same studies as without words to explain
    where = {"label_max": {"lvef": 45}}
    assert ([h["study_uid"] for h in _search(api, QUERY, filters=where)["hits"]]
            == [h["study_uid"] for h in _search(api, QUERY, filters=where, explain=False)["hits"]])


def test_a_query_without_known_findings_explains_nothing_and_neighbours_have_no_explanation(known):
    api, uids = known
    body = _search(api, "a heart")
    assert body["findings"] == [] and all(h["explanation"] == [] for h in body["hits"])
    hits = api.client.get(f"/studies/{uids[0]}/neighbors", headers=api.read).json()["hits"]
    assert hits and all("explanation" not in h for h in hits)


def test_no_patient_identifier_or_whole_report_is_in_the_response(known):
    api, _ = known
    text = json.dumps(_search(api, QUERY))
    keys = set(ClipStore.open(api.root).clip_metadata(["patient_key"])["patient_key"].to_pylist())
    assert "patient_key" not in text and keys and not any(key in text for key in keys)
    assert REPORTS[0] not in text and "LVEDV 310" not in text  # the phrases, not the report
