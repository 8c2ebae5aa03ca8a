"""Head metrics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cmr_search.metrics.prediction import (
    bland_altman,
    classification_metrics,
    regression_metrics,
    youden_point,
)


def test_regression_metrics_by_hand():
    y = np.array([50.0, 60.0, 40.0, 30.0])
    pred = np.array([52.0, 57.0, 41.0, 30.0])
    m = regression_metrics(y, pred)
    assert m["mae"] == pytest.approx(1.5) and m["rmse"] == pytest.approx(np.sqrt(14 / 4))
    diff = pred - y  # 2, -3, 1, 0
    assert m["bias"] == pytest.approx(0.0)
    assert m["loa_high"] == pytest.approx(1.96 * diff.std(ddof=1)) and m["loa_low"] == pytest.approx(-m["loa_high"])
    assert bland_altman(y, y + 1)["bias"] == pytest.approx(1.0)


def test_youden_and_fixed_threshold():
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.7, 0.9, 0.75, 0.4])
    point = youden_point(y, s)
    # at 0.4: every positive called, one negative (0.75) too: J = 1 + 3/4 - 1, the best
    assert point["threshold"] == pytest.approx(0.4) and point["sensitivity"] == 1.0 and point["specificity"] == 0.75
    m = classification_metrics(y, s, threshold=0.35)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75 and m["positives"] == 4
    assert m["auroc"] == pytest.approx(14 / 16)  # 14 of 16 positive-negative pairs ranked right
    one_class = classification_metrics(np.zeros(5), np.arange(5.0))
    assert np.isnan(one_class["auroc"])
