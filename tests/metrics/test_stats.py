"""AUROC, DeLong limits and DeLong tests against R's pROC (values stored in
data/proc_reference.json, and recomputed live where Rscript with pROC is installed) and against
small cases worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from proc_reference import REFERENCE_JSON, rscript, run_proc, stats_cases

from cmr_search.metrics.stats import (
    auroc,
    auroc_ci,
    delong_test,
    delong_unpaired_test,
    proc_direction,
)

TOL = 1e-6
REFERENCE = json.loads(REFERENCE_JSON.read_text())
CASES = REFERENCE["stats"]


def ours(c: dict) -> dict:
    """Our numbers for one case, under the names proc_reference.R gives pROC's."""
    y, yb, a, b = c["labels"], c["labels_b"], c["scores_a"], c["scores_b"]
    out = dict(zip(("auc_a", "lower_a", "upper_a"),
                   auroc_ci(y, a, c["level"], direction=c["dir_a"])))
    out |= {"direction_a": proc_direction(y, a) if c["dir_a"] == "auto" else c["dir_a"]}
    if b is not None:
        out |= dict(zip(("auc_b", "lower_b", "upper_b"),
                        auroc_ci(yb, b, c["level"], direction=c["dir_b"])))
        dirs = (c["dir_a"], c["dir_b"])
        if y == yb:
            out["p_paired"] = delong_test(y, a, b, direction=dirs)
        out["t_unpaired"], out["df_unpaired"], out["p_unpaired"] = delong_unpaired_test(
            y, a, yb, b, direction=dirs)
    return out


def assert_matches(mine: dict, proc: dict, name: str) -> None:
    for key, value in mine.items():
        if key.startswith("direction"):
            assert value == proc[key], f"{name}: {key}"
        else:
            assert proc[key] is not None, f"{name}: pROC has no {key}"
            assert value == pytest.approx(proc[key], abs=TOL, rel=1e-9), f"{name}: {key}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_stored_proc(name):
    case = CASES[name]
    assert_matches(ours(case["inputs"]), case["proc"], name)


def test_stored_cases_cover_ties_auto_direction_and_unpaired():
    assert any(len(set(c["inputs"]["scores_a"])) < len(c["inputs"]["scores_a"])
               for c in CASES.values())
    assert any(c["proc"]["direction_a"] == ">" for c in CASES.values())
    assert any(c["proc"]["p_paired"] is None for c in CASES.values())
    assert {"asah/s100b_ndka", "asah/s100b_wfns"} <= set(CASES)


def test_asah_matches_published_proc_values():
    # pROC's documentation: roc(aSAH$outcome, aSAH$s100b) has AUC 0.7314, CI 0.6301-0.8326
    auc, lo, hi = auroc_ci(REFERENCE["asah"]["outcome"], REFERENCE["asah"]["s100b"])
    assert (round(auc, 4), round(lo, 4), round(hi, 4)) == (0.7314, 0.6301, 0.8326)


@pytest.mark.skipif(rscript() is None, reason="Rscript with pROC not installed "
                    "(apt-get install r-base-core r-cran-proc)")
def test_matches_live_proc():
    stored_inputs = {k: c["inputs"] for k, c in CASES.items()}
    assert stats_cases(REFERENCE["asah"]).keys() == stored_inputs.keys()
    live = run_proc(stored_inputs)
    for name, c in stored_inputs.items():
        assert_matches(ours(c), live[name], name)


def test_perfect_and_reversed_separation():
    y = [0, 0, 0, 1, 1]
    assert auroc_ci(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == (1.0, 1.0, 1.0)  # zero variance: 1-1
    assert auroc(y, [0.9, 0.8, 0.7, 0.1, 0.2]) == 0.0
    assert auroc(y, [0.9, 0.8, 0.7, 0.1, 0.2], direction=">") == 1.0
    assert auroc(y, [0.9, 0.8, 0.7, 0.1, 0.2], direction="auto") == 1.0
    assert proc_direction(y, [0.9, 0.8, 0.7, 0.1, 0.2]) == ">"


def test_ties_count_one_half():
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert auroc([0, 0, 1, 1], [3.0, 3.0, 3.0, 3.0]) == 0.5
    # one case at 2 against controls 1, 2, 3: beats one, ties one -> (1 + 0.5) / 3
    assert auroc([0, 0, 0, 1], [1.0, 2.0, 3.0, 2.0]) == pytest.approx(0.5)


def test_two_by_two_by_hand():
    # cases 2, 4; controls 1, 3: pairs (2>1), (2<3), (4>1), (4>3) -> 3/4.
    y, s = [1, 1, 0, 0], [2.0, 4.0, 1.0, 3.0]
    # placements: cases x = (1/2, 1), controls y = (1, 1/2); var(x) = var(y) = 1/8 (n - 1 = 1)
    # S = 1/8 / 2 + 1/8 / 2 = 1/8; limits 3/4 -+ 1.959964 * sqrt(1/8), clipped at 1
    auc, lo, hi = auroc_ci(y, s)
    assert auc == 0.75
    assert lo == pytest.approx(0.75 - 1.959963984540054 * np.sqrt(1 / 8))
    assert hi == 1.0
    assert delong_test(y, s, s) == 1.0  # identical scores: d = 0 and sig = 0, pROC's z = 0


def test_single_case_gives_nan_limits():
    auc, lo, hi = auroc_ci([0, 0, 1], [0.1, 0.3, 0.2])
    assert auc == 0.5 and np.isnan(lo) and np.isnan(hi)


@pytest.mark.parametrize("labels, scores, message", [
    ([0, 1, 1], [0.1, 0.2], "same length"),
    ([[0, 1]], [[0.1, 0.2]], "1-d"),
    ([1, 1, 1], [0.1, 0.2, 0.3], "both classes"),
    ([0, 0], [0.1, 0.2], "both classes"),
    ([0, 1, 2], [0.1, 0.2, 0.3], "0 \\(control\\) or 1"),
    (["a", "b"], [0.1, 0.2], "numeric"),
    ([0, 1], [0.1, np.nan], "finite"),
    ([0, 1], [0.1, np.inf], "finite"),
    ([0, 1], ["x", "y"], "numeric"),
])
def test_bad_inputs(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        auroc_ci(labels, scores)


def test_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        auroc_ci([0, 1], [0.1, 0.2], level=1.5)
    with pytest.raises(ValueError, match="direction"):
        auroc([0, 1], [0.1, 0.2], direction="up")
    with pytest.raises(ValueError, match="scores_b"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2 cases"):
        delong_test([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
