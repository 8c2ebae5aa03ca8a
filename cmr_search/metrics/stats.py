"""AUROC statistics as R's pROC computes them: the AUROC with DeLong's confidence interval,
DeLong's paired and unpaired tests of two AUROCs, and pROC's automatic ROC direction.

DeLong's variance is computed with the midrank algorithm of Sun & Xu (2014), which gives the
same placements as pROC's ``delongPlacements`` (ties count one half) in O(n log n).
Validated against pROC 1.18 in ``tests/evals/test_stats.py``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t

__all__ = [
    "auroc",
    "auroc_ci",
    "delong_test",
    "delong_unpaired_test",
    "proc_direction",
]

DIRECTIONS = ("<", ">", "auto")


@dataclass(frozen=True)
class _Placements:
    """DeLong's placement values of one ROC curve: ``x`` per case, ``y`` per control."""

    theta: float  # the AUROC
    x: np.ndarray  # fraction of controls ranked below each case (ties count 1/2)
    y: np.ndarray  # fraction of cases ranked above each control (ties count 1/2)

    def variance(self) -> float:
        """DeLong's variance of theta: var(x)/m + var(y)/n with sample variances."""
        return _var(self.x) / len(self.x) + _var(self.y) / len(self.y)


def _var(v: np.ndarray) -> float:
    # pROC divides by (m - 1); with one observation it returns NA, which nan stands for here
    return float(np.sum((v - v.mean()) ** 2) / (len(v) - 1)) if len(v) > 1 else float("nan")


def _check(labels, scores, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and {name} must be 1-d arrays of the same length; "
                         f"got shapes {labels.shape} and {scores.shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"labels must be numeric 0/1; got dtype {labels.dtype}")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"labels must be 0 (control) or 1 (case); found {np.unique(labels[bad])[:5]}")
    if not (labels == 1).any() or not (labels == 0).any():
        raise ValueError(f"labels need both classes; got {int((labels == 1).sum())} cases "
                         f"and {int((labels == 0).sum())} controls")
    try:
        scores = scores.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric: {e}") from None
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} must be finite; {int((~np.isfinite(scores)).sum())} are NaN or "
                         "infinite (drop those studies first)")
    return labels.astype(np.int64), scores


def proc_direction(labels, scores) -> str:
    """pROC's ``direction="auto"``: ``"<"`` (controls score lower) when the controls' median is
    at most the cases' median, else ``">"``. Note this looks at medians, not at the AUROC."""
    labels, scores = _check(labels, scores)
    return "<" if np.median(scores[labels == 0]) <= np.median(scores[labels == 1]) else ">"


def _resolve(labels: np.ndarray, scores: np.ndarray, direction: str) -> np.ndarray:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    if direction == "auto":
        direction = proc_direction(labels, scores)
    return -scores if direction == ">" else scores


def _placements(labels: np.ndarray, scores: np.ndarray) -> _Placements:
    cases, controls = scores[labels == 1], scores[labels == 0]
    m, n = len(cases), len(controls)
    tz = rankdata(np.concatenate([cases, controls]))  # midranks over everyone
    x = (tz[:m] - rankdata(cases)) / n  # controls below each case (+1/2 per tie)
    y = 1.0 - (tz[m:] - rankdata(controls)) / m  # cases above each control (+1/2 per tie)
    theta = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    return _Placements(float(theta), x, y)


def auroc(labels, scores, *, direction: str = "<") -> float:
    """AUROC with cases (label 1) expected to score higher than controls (label 0); ties count
    one half. ``direction=">"`` expects them lower, ``"auto"`` chooses as pROC does."""
    labels, scores = _check(labels, scores)
    return _placements(labels, _resolve(labels, scores, direction)).theta


def auroc_ci(labels, scores, level: float = 0.95, *,
             direction: str = "<") -> tuple[float, float, float]:
    """``(auroc, lower, upper)``: the AUROC with DeLong's ``level`` confidence interval, clipped
    to [0, 1], as pROC's ``ci.auc(roc(labels, scores, direction="<", levels=c(0, 1)),
    method="delong")``. The limits are NaN when there is a single case or control (pROC: NA)."""
    if not 0 <= level <= 1:
        raise ValueError(f"level must be within [0, 1]; got {level}")
    labels, scores = _check(labels, scores)
    p = _placements(labels, _resolve(labels, scores, direction))
    sd = np.sqrt(p.variance())
    if np.isnan(sd):
        return p.theta, float("nan"), float("nan")
    alpha = 1.0 - level
    # qnorm(q, mean, sd = 0) is the mean in R; scipy would give NaN
    lo, hi = (norm.ppf([alpha / 2, 1 - alpha / 2], loc=p.theta, scale=sd) if sd > 0
              else (p.theta, p.theta))
    return p.theta, float(min(max(lo, 0.0), 1.0)), float(min(max(hi, 0.0), 1.0))


def delong_test(labels, scores_a, scores_b, *, direction: str | tuple[str, str] = "<") -> float:
    """Two-sided p-value of DeLong's test that two scores of the same studies have equal
    AUROC, as pROC's ``roc.test(roc_a, roc_b, method="delong", paired=TRUE)``. ``direction``
    may be one value or one per score (pROC's automatic direction can differ between them)."""
    labels, a = _check(labels, scores_a, "scores_a")
    _, b = _check(labels, scores_b, "scores_b")
    da, db = (direction, direction) if isinstance(direction, str) else direction
    pa = _placements(labels, _resolve(labels, a, da))
    pb = _placements(labels, _resolve(labels, b, db))
    m, n = len(pa.x), len(pa.y)
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 cases and 2 controls; got {m} and {n}")
    dx, dy = pa.x - pa.theta - (pb.x - pb.theta), pa.y - pa.theta - (pb.y - pb.theta)
    # L' S L with L = (1, -1): the variance of the difference of the placements
    sig = np.sqrt(np.sum(dx**2) / (m - 1) / m + np.sum(dy**2) / (n - 1) / n)
    d = pa.theta - pb.theta
    if sig == 0:
        return 1.0 if d == 0 else 0.0  # pROC: z = 0 when both d and sig are 0
    return float(2 * norm.cdf(-abs(d / sig)))


def delong_unpaired_test(labels_a, scores_a, labels_b, scores_b, *,
                         direction: str | tuple[str, str] = "<") -> tuple[float, float, float]:
    """``(t, df, p)``: DeLong's test of two AUROCs from independent samples, as pROC's
    ``roc.test(roc_a, roc_b, method="delong", paired=FALSE)``: a t statistic with
    Welch-Satterthwaite degrees of freedom, two-sided p-value."""
    la, a = _check(labels_a, scores_a, "scores_a")
    lb, b = _check(labels_b, scores_b, "scores_b")
    da, db = (direction, direction) if isinstance(direction, str) else direction
    pa, pb = _placements(la, _resolve(la, a, da)), _placements(lb, _resolve(lb, b, db))
    sa, sb = pa.variance(), pb.variance()
    t = (pa.theta - pb.theta) / np.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (len(la) - 1) + sb**2 / (len(lb) - 1))
    return float(t), float(df), float(2 * student_t.cdf(-abs(t), df))
