"""Retrieval metrics and the issue-7 query evaluations against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmr_search.evals.queries import (
    KINDS,
    negation_pairs,
    own_report_retrieval,
    phrase_queries,
    phrase_query_eval,
    scan_to_scan_eval,
    severity_confusion,
    summarise_by_kind,
)
from cmr_search.metrics.retrieval import (
    average_precision_at_k,
    ndcg_at_k,
    precision_at_k,
    rank_candidates,
    retrieval_summary,
)
from cmr_search.synth.labels import LABEL_COLUMNS

L3 = math.log2(3)

# 3 queries x 5 candidates
SIM = np.array([
    [0.9, 0.1, 0.8, 0.3, 0.5],  # ranking 0, 2, 4, 3, 1
    [0.2, 0.7, 0.7, 0.1, 0.4],  # tie 1 = 2: the lower index first -> 1, 2, 4, 0, 3
    [0.0, 0.0, 0.0, 0.0, 0.0],  # all tied -> 0, 1, 2, 3, 4
])
GAINS = np.array([
    [1, 1, 0, 0, 1],  # top 3 gains 1, 0, 1; R = 3
    [0, 0.5, 1.0, 0, 0],  # graded; top 3 gains 0.5, 1.0, 0; R = 2
    [0, 0, 0, 1, 0],  # top 3 gains 0, 0, 0; R = 1
])


def test_rank_candidates_is_stable_and_puts_excluded_last():
    assert rank_candidates(SIM).tolist() == [[0, 2, 4, 3, 1], [1, 2, 4, 0, 3], [0, 1, 2, 3, 4]]
    exclude = np.zeros_like(SIM, bool)
    exclude[0, 0] = exclude[2, 1] = True
    assert rank_candidates(SIM, 3, exclude).tolist() == [[2, 4, 3], [1, 2, 4], [0, 2, 3]]


def test_rank_candidates_top_k_equals_the_full_sort():
    # the partial sort for small k must cut the full stable sort exactly, ties and NaNs included
    rng = np.random.default_rng(1)
    for trial in range(60):
        sim = np.round(rng.normal(size=(7, 40)), trial % 3)
        sim[rng.random(sim.shape) < 0.05 * (trial % 2)] = np.nan
        exclude = rng.random(sim.shape) < 0.2
        full = rank_candidates(sim, None, exclude)
        for k in (1, 3, 10, 50):
            assert (rank_candidates(sim, k, exclude) == full[:, :k]).all()


def test_precision_at_k_by_hand():
    # q0: 2 of 3 relevant; q1: both gains > 0 count; q2: none
    assert precision_at_k(SIM, GAINS, 3) == pytest.approx([2 / 3, 2 / 3, 0.0])


def test_ndcg_at_k_by_hand():
    got = ndcg_at_k(SIM, GAINS, 3)
    # q0: DCG = 1/log2(2) + 0 + 1/log2(4) = 1.5; ideal 1, 1, 1 -> 1 + 1/log2(3) + 1/2
    assert got[0] == pytest.approx(1.5 / (1.5 + 1 / L3))
    # q1: DCG = 0.5 + 1.0/log2(3); ideal order 1.0, 0.5 -> 1 + 0.5/log2(3)
    # (breaking the tie the other way would make it ideal: 1.0)
    assert got[1] == pytest.approx((0.5 + 1 / L3) / (1 + 0.5 / L3))
    assert got[2] == 0.0  # one relevant, not retrieved
    assert np.isnan(ndcg_at_k(SIM[:1], np.zeros((1, 5)), 3)[0])  # nothing relevant: undefined


def test_average_precision_at_k_by_hand():
    got = average_precision_at_k(SIM, GAINS, 3)
    # q0: hits at ranks 1 and 3 -> (1/1 + 2/3) / min(3, R=3) = 5/9
    # q1: hits at ranks 1 and 2 -> (1 + 1) / min(3, R=2) = 1
    # q2: no hit in the top 3, R = 1 -> 0
    assert got == pytest.approx([5 / 9, 1.0, 0.0])
    # k = 2 < R = 3: normaliser min(2, 3) = 2 -> (1/1) / 2
    assert average_precision_at_k(SIM[:1], GAINS[:1], 2)[0] == pytest.approx(0.5)
    assert np.isnan(average_precision_at_k(SIM[:1], np.zeros((1, 5)), 3)[0])


def test_exclusion_removes_candidates_from_ranking_and_pool():
    exclude = np.zeros_like(SIM, bool)
    exclude[0, 0] = True  # q0 loses its best, relevant candidate: ranking 2, 4, 3 -> gains 0, 1, 0
    assert precision_at_k(SIM, GAINS, 3, exclude)[0] == pytest.approx(1 / 3)
    # R drops to 2: (1/2) / min(3, 2)
    assert average_precision_at_k(SIM, GAINS, 3, exclude)[0] == pytest.approx(0.25)
    # ideal 1, 1 -> 1 + 1/log2(3); DCG = 1/log2(3)
    assert ndcg_at_k(SIM, GAINS, 3, exclude)[0] == pytest.approx((1 / L3) / (1 + 1 / L3))


def test_k_past_the_pool_counts_missing_places_as_misses():
    assert precision_at_k(SIM[:1], GAINS[:1], 10)[0] == pytest.approx(3 / 10)
    assert average_precision_at_k(SIM[:1], GAINS[:1], 10)[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_retrieval_summary_unchanged():
    out = retrieval_summary(np.eye(4), np.arange(4), ks=(1, 2))
    assert out == {"R@1": 1.0, "R@2": 1.0, "median_rank": 1.0, "pool": 4}


def test_query_suite_names_only_present_columns():
    some = ["lv_thrombus", "pericardial_effusion"]
    queries = phrase_queries(some)
    assert {q.text for q in queries} == {"apical LV thrombus", "no LV thrombus", "pericardial effusion",
                                         "no pericardial effusion"}
    assert all(set(q.requires) <= set(some) for q in queries)
    every = phrase_queries(LABEL_COLUMNS)
    assert {q.kind for q in every} == set(KINDS)
    assert all(set(q.requires) <= set(LABEL_COLUMNS) for q in every)
    texts = [q.text for q in every]
    assert len(set(texts)) == len(texts)
    assert {"mild LV dilatation", "severe LV dilatation with apical thrombus", "normal LV size"} <= set(texts)
    assert phrase_queries([]) == []


def test_relevance_functions_on_a_tiny_label_table():
    labels = {
        "lv_thrombus": np.array([1, 0, np.nan, 1]),
        "lv_dilatation_grade": np.array([0, 1, 2, 3]),
        "lvef": np.array([55.0, 45.0, 35.0, 25.0]),
        "effusion_mm": np.array([0.0, 6.0, 12.0, np.nan]),
        "hcm": np.array([0, 1, 0, 0]),
        "concentric_lvh": np.array([0, 0, 1, np.nan]),
    }
    gain = {q.text: q.relevance(labels).tolist() for q in phrase_queries(labels)}
    assert gain["apical LV thrombus"] == [1, 0, 0, 1]
    assert gain["no LV thrombus"] == [0, 1, 0, 0]  # a missing label is neither
    assert gain["mild LV dilatation"] == [0, 1, 0.5, 0]  # grade 0 is no near miss
    assert gain["moderate LV dilatation"] == [0, 0.5, 1, 0.5]
    assert gain["severe LV dilatation"] == [0, 0, 0.5, 1]
    assert gain["mildly impaired LV systolic function"] == [0, 1, 0.5, 0]
    assert gain["severely impaired LV systolic function"] == [0, 0, 0.5, 1]
    assert gain["small pericardial effusion"] == [0, 1, 0.5, 0]
    assert gain["severe LV dilatation with apical thrombus"] == [0, 0, 0, 1]
    assert gain["left ventricular hypertrophy"] == [0, 1, 1, 0]  # either hcm or concentric LVH
    assert gain["no LV hypertrophy"] == [1, 0, 0, 0]


def _suite_case():
    # studies 0, 1 have a thrombus and lie along e0; 2, 3 along e1
    labels = {"lv_thrombus": np.array([1, 1, 0, 0]), "pericardial_effusion": np.array([0, 1, 0, 1])}
    studies = np.array([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]])
    queries = phrase_queries(labels)
    # a model that ignores "no": both thrombus queries point at the thrombus studies
    direction = {"apical LV thrombus": [1, 0, 0], "no LV thrombus": [1, 0, 0],
                 "pericardial effusion": [0, 0, 1], "no pericardial effusion": [0, 0, 1]}
    vectors = np.array([direction[q.text] for q in queries], np.float64)
    return labels, studies, queries, vectors


def test_phrase_query_eval_rows_and_negation_pairs():
    labels, studies, queries, vectors = _suite_case()
    rows = {r["text"]: r for r in phrase_query_eval(vectors, studies, queries, labels, k=2)}
    pos, neg = rows["apical LV thrombus"], rows["no LV thrombus"]
    assert pos["top_k"] == [0, 1] and pos["precision"] == 1.0 and pos["ap"] == 1.0 and pos["ndcg"] == 1.0
    assert pos["prevalence"] == 0.5 and pos["lift"] == 2.0 and pos["pool"] == 4 and pos["relevant"] == 2
    assert neg["top_k"] == [0, 1] and neg["precision"] == 0.0 and neg["ap"] == 0.0
    assert neg["finding_rate"] == 1.0 and neg["finding_prevalence"] == 0.5
    # orthogonal query: every similarity 0, ranking by index: 0, 1 -> effusion in 1 of 2
    assert rows["pericardial effusion"]["precision"] == 0.5 and rows["pericardial effusion"]["lift"] == 1.0

    pairs = {p["finding"]: p for p in negation_pairs(list(rows.values()))}
    assert set(pairs) == {"lv_thrombus", "pericardial_effusion"}
    thrombus = pairs["lv_thrombus"]
    assert thrombus["jaccard"] == 1.0  # identical rankings
    assert thrombus["negated_finding_rate"] == thrombus["positive_finding_rate"] == 1.0

    by_kind = summarise_by_kind(list(rows.values()))
    assert set(by_kind) == {"positive", "negated"}
    # positive: precision (1 + 0.5) / 2 over prevalence (0.5 + 0.5) / 2
    assert by_kind["positive"]["precision"] == 0.75 and by_kind["positive"]["lift"] == 1.5
    assert by_kind["negated"]["queries"] == 2 and by_kind["negated"]["no_relevant"] == 0


def test_severity_confusion_counts_true_grades():
    grades = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    studies = np.eye(4)[grades]  # each study along its grade's axis
    labels = {"lv_dilatation_grade": grades}
    queries = phrase_queries(labels)
    assert [q.grade for q in queries] == [1, 2, 3]
    vectors = np.eye(4)[[1, 2, 3]]  # a model that grades perfectly
    out = severity_confusion(vectors, studies, queries, labels, k=2)["lv_dilatation"]
    assert out["counts"] == [[0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]]
    assert out["pool_fractions"] == [0.25] * 4 and out["exact"] == 1.0 and out["chance_exact"] == 0.25
    # a model blind to severity: every query finds the same mild studies
    blind = severity_confusion(np.eye(4)[[1, 1, 1]], studies, queries, labels, k=2)["lv_dilatation"]
    assert blind["counts"] == [[0, 2, 0, 0]] * 3 and blind["exact"] == pytest.approx(1 / 3)


def test_own_report_retrieval():
    studies = np.eye(4)
    out = own_report_retrieval(studies, studies, ks=(1, 2))
    assert out["R@1"] == 1.0 and out["pool"] == 4 and out["queries"] == 4 and out["chance_R@2"] == 0.5
    shifted = own_report_retrieval(np.roll(studies, 1, axis=0), studies, ks=(1,))
    assert shifted["R@1"] == 0.0


def _angles(*degrees: float) -> np.ndarray:
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_scan_to_scan_excludes_self_and_same_patient():
    vectors = _angles(0, 0, 10, 90, 80, 86)
    labels = {"a": np.array([1, 1, 0, 0, 0, 0]), "b": np.array([0, 0, 1, 1, 1, 1])}
    # nearest other: 0 -> 1, 1 -> 0 (share a), 2 -> 0 (a vs b: miss), 3 -> 5, 4 -> 5, 5 -> 3 (share b);
    # with itself in the pool, every query would find itself first (mAP 1)
    out = scan_to_scan_eval(vectors, labels, ["a", "b"], k=1)
    assert out["map"] == pytest.approx(5 / 6) and out["mean_pool"] == 5
    assert out["prevalence"] == pytest.approx((2 * 1 / 5 + 4 * 3 / 5) / 6)
    assert out["per_label"]["a"] == {"queries": 2, "map": 1.0, "prevalence": pytest.approx(0.2)}
    assert out["per_label"]["b"]["map"] == 0.75 and out["lvef"] is None
    # 0 and 1 are one patient: nothing in their pools shares a label, so they go unscored;
    # 2 still misses, 3, 4, 5 still hit
    same = scan_to_scan_eval(vectors, labels, ["a", "b"], patient_keys=np.array(list("AABCDE")), k=1)
    assert same["map"] == pytest.approx(3 / 4) and same["scored"] == 4 and out["scored"] == 6
    assert same["mean_pool"] == pytest.approx(28 / 6)
    assert np.isnan(same["per_label"]["a"]["map"]) and same["per_label"]["a"]["prevalence"] == 0.0
    assert same["same_patient_excluded"]


def test_scan_to_scan_queries_without_labels_match_studies_without_labels():
    # 0 -> 1 (both none: relevant), 1 -> 0 (relevant), 2 (a) -> 1 (none: miss), 3 (a) -> 2 (hit)
    out = scan_to_scan_eval(_angles(0, 5, 30, 120), {"a": np.array([0, 0, 1, 1])}, ["a"], k=1)
    assert out["map"] == pytest.approx(3 / 4)


def test_lvef_agreement_when_neighbours_are_exact():
    vectors = _angles(0, 0, 45, 45, 90, 90)  # three pairs of twins with equal LVEF
    lvef = np.array([30.0, 30.0, 50.0, 50.0, 70.0, 70.0])
    out = scan_to_scan_eval(vectors, {}, [], lvef=lvef, k=1, seed=3)["lvef"]
    assert out["n"] == 6 and out["mae_neighbours"] == 0.0 and out["r"] == pytest.approx(1.0)
    assert out["mae_random"] > 0
    assert scan_to_scan_eval(vectors, {}, [], lvef=lvef, k=1, seed=3)["lvef"] == out  # seeded
    # twins as one patient: the nearest allowed study is the neighbouring pair, 20 % off
    twins = scan_to_scan_eval(vectors, {}, [], lvef=lvef, patient_keys=np.array([0, 0, 1, 1, 2, 2]), k=1)
    assert twins["lvef"]["mae_neighbours"] == pytest.approx(20.0)
