"""Clinical phrase queries over the synthetic label columns, and the retrieval evaluations of
issue 7: phrase queries (positive, negated, severity, combination) with diagnostics of where
negation and severity fail, each study's own report as query, and scan-to-scan neighbours.

Pure functions over arrays: the caller encodes the query texts and loads the study vectors.
Vectors are compared by cosine similarity (rows are L2-normalised here). A label table is a
dict of columns (np.ndarray [N], NaN where missing); a missing label is never relevant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cmr_search.metrics.retrieval import metrics_at_k, rank_candidates, retrieval_summary
from cmr_search.synth.labels import THRESHOLDS

__all__ = [
    "KINDS", "SEVERITY", "PhraseQuery", "negation_pairs", "own_report_retrieval",
    "phrase_queries", "phrase_query_eval", "scan_to_scan_eval", "severity_confusion",
    "summarise_by_kind",
]

Labels = dict[str, np.ndarray]
KINDS = ("positive", "negated", "severity", "combination")


@dataclass(frozen=True)
class PhraseQuery:
    """A query text, its kind (one of KINDS) and ``relevance``: label table -> gain per
    study [N]. ``finding`` pairs a negated query with its positive one and groups severity
    grades; ``grade`` is a severity query's grade; ``requires`` the columns it reads."""

    text: str
    kind: str
    relevance: Callable[[Labels], np.ndarray] = field(repr=False, compare=False)
    finding: str = ""
    grade: int | None = None
    requires: tuple[str, ...] = ()


def _col(labels: Labels, name: str) -> np.ndarray:
    return np.asarray(labels[name], np.float64)


def _present(cols: tuple[str, ...]):
    # NaN == 1 is False: a missing label never counts as present (nor, below, as absent)
    return lambda t: np.logical_or.reduce([_col(t, c) == 1 for c in cols]).astype(np.float64)


def _absent(cols: tuple[str, ...]):
    return lambda t: np.logical_and.reduce([_col(t, c) == 0 for c in cols]).astype(np.float64)


def _where(spec: dict[str, float]):
    return lambda t: np.logical_and.reduce([_col(t, c) == v for c, v in spec.items()]).astype(np.float64)


# finding: (positive text, negated text or None, label columns). The wording follows the
# templates of evals/synth/reports.py (impression phrases, "No ..." negations) without being
# any one report's sentence; a multi-column finding is present when any column is.
_FINDINGS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "lv_dilatation": ("dilated left ventricle", "normal LV size", ("lv_dilatation",)),
    # reduced_lvef is LVEF < 40, so "preserved" also admits the 40-50 % "mildly impaired"
    "reduced_lvef": ("reduced LV ejection fraction", "preserved LV systolic function", ("reduced_lvef",)),
    "lv_hypertrophy": ("left ventricular hypertrophy", "no LV hypertrophy", ("hcm", "concentric_lvh")),
    "hcm": ("hypertrophic cardiomyopathy", None, ("hcm",)),
    "concentric_lvh": ("concentric LV hypertrophy", None, ("concentric_lvh",)),
    "dcm": ("dilated cardiomyopathy", None, ("dcm",)),
    "lv_thrombus": ("apical LV thrombus", "no LV thrombus", ("lv_thrombus",)),
    "apical_akinesis": ("apical akinesis", "no regional wall motion abnormality", ("apical_akinesis",)),
    "rv_dilatation": ("dilated right ventricle", "normal RV size", ("rv_dilatation",)),
    "rv_dysfunction": ("impaired RV systolic function", "preserved RV function", ("rv_dysfunction",)),
    "la_dilatation": ("dilated left atrium", None, ("la_dilatation",)),
    "ra_dilatation": ("right atrial dilatation", None, ("ra_dilatation",)),
    "pericardial_effusion": ("pericardial effusion", "no pericardial effusion", ("pericardial_effusion",)),
}


@dataclass(frozen=True)
class _Scale:
    column: str
    grade: Callable[[np.ndarray], np.ndarray]  # column values -> grade 0..3, NaN if missing
    names: tuple[str, str, str, str]  # grades 0..3
    texts: tuple[str, str, str]  # queries for grades 1..3


def _graded(cuts: list[float], descending: bool = False):
    def grade(x: np.ndarray) -> np.ndarray:
        g = np.digitize(x, cuts).astype(np.float64)
        return np.where(np.isnan(x), np.nan, len(cuts) - g if descending else g)
    return grade


# Grade cut-offs mirror reports.py: LVEF >= 50 normal, 40-50 mild, 30-40 moderate, < 30
# severe; effusion < 5 mm none (the label's threshold), < 10 small, < 20 moderate, large.
SEVERITY: dict[str, _Scale] = {
    "lv_dilatation": _Scale(
        "lv_dilatation_grade", lambda x: np.asarray(x, np.float64), ("none", "mild", "moderate", "severe"),
        ("mild LV dilatation", "moderate LV dilatation", "severe LV dilatation")),
    "lv_systolic_function": _Scale(
        "lvef", _graded([30.0, 40.0, 50.0], descending=True), ("normal", "mild", "moderate", "severe"),
        ("mildly impaired LV systolic function", "moderately impaired LV systolic function",
         "severely impaired LV systolic function")),
    "pericardial_effusion": _Scale(
        "effusion_mm", _graded([THRESHOLDS.effusion_mm, 10.0, 20.0]), ("none", "small", "moderate", "large"),
        ("small pericardial effusion", "moderate pericardial effusion", "large pericardial effusion")),
}


def _severity_gain(scale: _Scale, q: int):
    # exact grade 1.0; an adjacent abnormal grade 0.5 (a near miss); grade 0 (no finding)
    # earns nothing, since returning a normal study for "mild ..." is a wrong finding
    def gain(t: Labels) -> np.ndarray:
        g = scale.grade(_col(t, scale.column))
        return np.where(g == q, 1.0, np.where((g >= 1) & (np.abs(g - q) == 1), 0.5, 0.0))
    return gain


_COMBINATIONS: tuple[tuple[str, dict[str, float]], ...] = (
    ("severe LV dilatation with apical thrombus", {"lv_dilatation_grade": 3, "lv_thrombus": 1}),
    ("apical akinesis with LV thrombus", {"apical_akinesis": 1, "lv_thrombus": 1}),
    ("apical akinesis without LV thrombus", {"apical_akinesis": 1, "lv_thrombus": 0}),
    ("dilated LV with reduced ejection fraction", {"lv_dilatation": 1, "reduced_lvef": 1}),
    ("hypertrophic cardiomyopathy with pericardial effusion", {"hcm": 1, "pericardial_effusion": 1}),
    ("dilated right ventricle with impaired RV function", {"rv_dilatation": 1, "rv_dysfunction": 1}),
)


def phrase_queries(columns: Iterable[str]) -> list[PhraseQuery]:
    """The fixed query suite, restricted to queries whose label columns are all present.
    Positive, negated and combination gains are 0/1; severity gains are graded (exact grade
    1.0, adjacent abnormal grade 0.5, else 0)."""
    out = []
    for finding, (pos, neg, cols) in _FINDINGS.items():
        out.append(PhraseQuery(pos, "positive", _present(cols), finding, requires=cols))
        if neg:
            out.append(PhraseQuery(neg, "negated", _absent(cols), finding, requires=cols))
    for finding, scale in SEVERITY.items():
        for g, text in enumerate(scale.texts, 1):
            out.append(PhraseQuery(text, "severity", _severity_gain(scale, g), finding, g, (scale.column,)))
    for text, spec in _COMBINATIONS:
        out.append(PhraseQuery(text, "combination", _where(spec), requires=tuple(spec)))
    have = set(columns)
    return [q for q in out if set(q.requires) <= have]


def phrase_query_eval(query_vectors: np.ndarray, study_vectors: np.ndarray, queries: Sequence[PhraseQuery],
                      labels: Labels, k: int = 10) -> list[dict]:
    """One row per query: text, kind, finding, k, pool (N), relevant (gain > 0 in the pool),
    prevalence (relevant / pool: a random ranking's expected precision while k <= pool),
    precision, ndcg, ap (all at k), lift (precision / prevalence), finding_rate (share of the
    top k that have the query's finding; NaN when it has none), finding_prevalence, top_k
    (study indices)."""
    q, s = _unit(query_vectors), _unit(study_vectors)
    if len(q) != len(queries):
        raise ValueError(f"{len(q)} query vectors for {len(queries)} queries")
    if not queries:
        return []
    gains = np.stack([np.asarray(pq.relevance(labels), np.float64) for pq in queries])
    if gains.shape != (len(q), len(s)):
        raise ValueError(f"label columns have {gains.shape[1]} rows for {len(s)} study vectors")
    top = rank_candidates(q @ s.T, k)
    m = metrics_at_k(np.take_along_axis(gains, top, axis=1), gains, k)
    rows = []
    for i, pq in enumerate(queries):
        prevalence = m["relevant"][i] / len(s)
        has = _present(_FINDINGS[pq.finding][2])(labels) if pq.finding in _FINDINGS else None
        rows.append({
            "text": pq.text, "kind": pq.kind, "finding": pq.finding, "k": k, "pool": len(s),
            "relevant": int(m["relevant"][i]), "prevalence": float(prevalence),
            "precision": float(m["precision"][i]), "ndcg": float(m["ndcg"][i]), "ap": float(m["ap"][i]),
            "lift": float(m["precision"][i] / prevalence) if prevalence else float("nan"),
            "finding_rate": float(has[top[i]].mean()) if has is not None else float("nan"),
            "finding_prevalence": float(has.mean()) if has is not None else float("nan"),
            "top_k": top[i].tolist(),
        })
    return rows


def summarise_by_kind(rows: Sequence[dict]) -> dict[str, dict]:
    """Per kind: queries, no_relevant (queries with nothing relevant in the pool), the mean
    precision, ndcg, ap and prevalence, and lift = mean precision / mean prevalence (a ratio
    of means, so one very rare query cannot dominate it)."""
    out = {}
    for kind in [k for k in KINDS if any(r["kind"] == k for r in rows)]:
        group = [r for r in rows if r["kind"] == kind]
        mean = {m: _nanmean([r[m] for r in group]) for m in ("precision", "ndcg", "ap", "prevalence")}
        out[kind] = {"queries": len(group), "no_relevant": sum(r["relevant"] == 0 for r in group), **mean,
                     "lift": mean["precision"] / mean["prevalence"] if mean["prevalence"] else float("nan")}
    return out


def negation_pairs(rows: Sequence[dict]) -> list[dict]:
    """Each negated query beside its positive counterpart: finding, negated, positive, k,
    negated_finding_rate and positive_finding_rate (share of each top k that HAS the
    finding), finding_prevalence, and jaccard of the two top-k sets. A model that ignores
    "no" returns the same studies for both: jaccard near 1, equal finding rates."""
    positive = {r["finding"]: r for r in rows if r["kind"] == "positive"}
    out = []
    for r in rows:
        p = positive.get(r["finding"])
        if r["kind"] != "negated" or p is None:
            continue
        a, b = set(r["top_k"]), set(p["top_k"])
        out.append({"finding": r["finding"], "negated": r["text"], "positive": p["text"], "k": r["k"],
                    "negated_finding_rate": r["finding_rate"], "positive_finding_rate": p["finding_rate"],
                    "finding_prevalence": r["finding_prevalence"],
                    "jaccard": len(a & b) / len(a | b) if a | b else float("nan")})
    return out


def severity_confusion(query_vectors: np.ndarray, study_vectors: np.ndarray, queries: Sequence[PhraseQuery],
                       labels: Labels, k: int = 10) -> dict[str, dict]:
    """Per graded finding: the true grades of each severity query's top k. Keys: k, grades
    (names of 0..3), queries, query_grades, counts [queries x 4] (studies of each true grade),
    fractions (counts over the known grades), missing (top-k studies without a grade),
    pool_fractions [4] (grade shares in the whole pool: what chance would give), exact (mean
    share at the asked grade) and chance_exact (the pool's mean share of the asked grades)."""
    q, s = _unit(query_vectors), _unit(study_vectors)
    sel = [i for i, pq in enumerate(queries) if pq.kind == "severity" and pq.finding in SEVERITY]
    if not sel:
        return {}
    top = rank_candidates(q[sel] @ s.T, k)
    out = {}
    for finding in dict.fromkeys(queries[i].finding for i in sel):
        scale = SEVERITY[finding]
        grades = scale.grade(_col(labels, scale.column))
        known = grades[~np.isnan(grades)].astype(int)
        pool = np.bincount(known, minlength=4) / max(len(known), 1)
        idx = [j for j, i in enumerate(sel) if queries[i].finding == finding]
        asked = [queries[sel[j]].grade for j in idx]
        counts = np.zeros((len(idx), 4), int)
        missing = []
        for r, j in enumerate(idx):
            g = grades[top[j]]
            counts[r] = np.bincount(g[~np.isnan(g)].astype(int), minlength=4)
            missing.append(int(np.isnan(g).sum()))
        fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        out[finding] = {
            "k": k, "grades": list(scale.names), "queries": [queries[sel[j]].text for j in idx],
            "query_grades": asked, "counts": counts.tolist(), "fractions": fractions.tolist(),
            "missing": missing, "pool_fractions": pool.tolist(),
            "exact": float(np.mean([fractions[r, g] for r, g in enumerate(asked)])),
            "chance_exact": float(np.mean([pool[g] for g in asked])),
        }
    return out


def own_report_retrieval(report_vectors: np.ndarray, study_vectors: np.ndarray,
                         ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Row i's report as query against all N studies, its own study the target. Keys: R@k
    per k, median_rank, pool (N), queries (N), and chance_R@k (= k / N)."""
    r, s = _unit(report_vectors), _unit(study_vectors)
    if r.shape != s.shape:
        raise ValueError(f"expected one report per study; got {r.shape} and {s.shape}")
    out = retrieval_summary(r @ s.T, np.arange(len(s)), ks)
    out["queries"] = len(s)
    return out | {f"chance_R@{k}": min(k, len(s)) / len(s) if len(s) else float("nan") for k in ks}


def scan_to_scan_eval(study_vectors: np.ndarray, labels: Labels, label_names: list[str],
                      lvef: np.ndarray | None = None, patient_keys: np.ndarray | None = None,
                      k: int = 10, seed: int = 0) -> dict:
    """Each study as a query against all OTHER studies (and, given patient_keys, none of its
    patient's). A neighbour is relevant when it shares at least one positive label among
    ``label_names`` with the query, or, for a query with none positive, when it has none too.

    Keys: k, queries, mean_pool, same_patient_excluded, map (mean AP@k over the ``scored``
    queries: those with something relevant in their pool), precision, prevalence (mean share of relevant in the pool: chance),
    per_label {name: {queries, map, prevalence}} (queries positive for the label, neighbours
    positive for it), lvef (None without lvef) {n, mae_neighbours, mae_random, r, r_random}:
    |own LVEF - mean LVEF of the k neighbours|, against k random allowed studies (seeded)."""
    s = _unit(study_vectors)
    n = len(s)
    y = (np.stack([_col(labels, c) == 1 for c in label_names], axis=1) if label_names
         else np.zeros((n, 0), bool))
    none = ~y.any(axis=1)
    keys = None if patient_keys is None else np.asarray(patient_keys)
    lv = None if lvef is None else np.asarray(lvef, np.float64)
    rng = np.random.default_rng(seed)
    ap, precision, prevalence, pool_sizes = [], [], [], []
    per = {c: ([], []) for c in label_names}
    nb_mean, rand_mean = np.full(n, np.nan), np.full(n, np.nan)
    block = max(1, (1 << 22) // max(n, 1))  # bounds the [block, N] matrices in memory
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        excl = rows[:, None] == np.arange(n)[None, :]
        if keys is not None:
            excl |= keys[rows][:, None] == keys[None, :]
        allowed = ~excl
        pool_n = np.maximum(allowed.sum(axis=1), 1)
        top = rank_candidates(s[rows] @ s.T, k, excl)
        # a top k longer than the pool holds excluded studies: they are never relevant
        valid = np.take_along_axis(allowed, top, axis=1)
        overlap = (y[rows].astype(np.float64) @ y.T.astype(np.float64)) > 0
        gains = np.where(none[rows][:, None], none[None, :], overlap) & allowed
        m = metrics_at_k(np.take_along_axis(gains, top, axis=1), gains, k)
        ap.append(m["ap"])
        precision.append(m["precision"])
        prevalence.append(gains.sum(axis=1) / pool_n)
        pool_sizes.append(allowed.sum(axis=1))
        for li, c in enumerate(label_names):
            qpos = y[rows, li]
            if qpos.any():
                g = y[None, :, li] & allowed[qpos]
                ml = metrics_at_k(np.take_along_axis(g, top[qpos], axis=1), g, k)
                per[c][0].append(ml["ap"])
                per[c][1].append(g.sum(axis=1) / pool_n[qpos])
        if lv is not None:
            nb_mean[rows] = _row_nanmean(np.where(valid, lv[top], np.nan))
            rand = rank_candidates(rng.random(excl.shape), k, excl)
            rand_ok = np.take_along_axis(allowed, rand, axis=1)
            rand_mean[rows] = _row_nanmean(np.where(rand_ok, lv[rand], np.nan))
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0))
    out = {
        "k": k, "queries": n, "mean_pool": _nanmean(cat(pool_sizes)),
        "same_patient_excluded": keys is not None, "map": _nanmean(cat(ap)),
        "scored": int((~np.isnan(cat(ap))).sum()),
        "precision": _nanmean(cat(precision)), "prevalence": _nanmean(cat(prevalence)),
        "per_label": {c: {"queries": int(y[:, li].sum()), "map": _nanmean(cat(per[c][0])),
                          "prevalence": _nanmean(cat(per[c][1]))} for li, c in enumerate(label_names)},
        "lvef": None,
    }
    if lv is not None:
        ok, ok_rand = np.isfinite(lv) & np.isfinite(nb_mean), np.isfinite(lv) & np.isfinite(rand_mean)
        out["lvef"] = {"n": int(ok.sum()),
                       "mae_neighbours": _nanmean(np.abs(lv[ok] - nb_mean[ok])),
                       "mae_random": _nanmean(np.abs(lv[ok_rand] - rand_mean[ok_rand])),
                       "r": _pearson(lv[ok], nb_mean[ok]),
                       "r_random": _pearson(lv[ok_rand], rand_mean[ok_rand])}
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected vectors [N, D]; got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nanmean(values) -> float:
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def _row_nanmean(a: np.ndarray) -> np.ndarray:
    # np.nanmean warns on all-NaN rows; those stay NaN here, silently
    count = (~np.isnan(a)).sum(axis=1)
    return np.where(count > 0, np.nansum(a, axis=1) / np.maximum(count, 1), np.nan)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
