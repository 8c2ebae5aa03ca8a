"""Metrics of a head's predictions as pure functions: regression (MAE, RMSE, Bland-Altman)
and binary classification (AUROC, AUPRC, sensitivity and specificity at the Youden point).
The curves and areas are scikit-learn's."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["bland_altman", "classification_metrics", "regression_metrics", "youden_point"]


def bland_altman(y: np.ndarray, pred: np.ndarray) -> dict:
    """Bias (mean of prediction - truth) and the 95 % limits of agreement (bias ± 1.96 SD)."""
    diff = np.asarray(pred, np.float64) - np.asarray(y, np.float64)
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    return {"bias": bias, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    """MAE, RMSE, Pearson r and the Bland-Altman bias and limits; ``n`` studies."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    if y.shape != pred.shape or y.ndim != 1 or not len(y):
        raise ValueError(f"expected two equal-length 1-d arrays; got {y.shape} and {pred.shape}")
    err = pred - y
    r = float(np.corrcoef(y, pred)[0, 1]) if len(y) > 1 and y.std() > 0 and pred.std() > 0 else float("nan")
    return {"n": len(y), "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())), "r": r,
            **bland_altman(y, pred)}


def youden_point(y: np.ndarray, score: np.ndarray) -> dict:
    """The threshold that maximises sensitivity + specificity - 1, with both at it."""
    fpr, tpr, thresholds = roc_curve(y, score)
    best = int(np.argmax(tpr - fpr))
    return {"threshold": float(thresholds[best]), "sensitivity": float(tpr[best]), "specificity": float(1 - fpr[best])}


def classification_metrics(y: np.ndarray, score: np.ndarray, threshold: float | None = None) -> dict:
    """AUROC, AUPRC (average precision), prevalence, and sensitivity/specificity at the
    Youden threshold of these scores, or at ``threshold`` (e.g. one chosen on validation)."""
    y, score = np.asarray(y).astype(int), np.asarray(score, np.float64)
    if y.shape != score.shape or y.ndim != 1:
        raise ValueError(f"expected two equal-length 1-d arrays; got {y.shape} and {score.shape}")
    out = {"n": len(y), "positives": int(y.sum()), "prevalence": float(y.mean()) if len(y) else float("nan")}
    if not 0 < y.sum() < len(y):  # one class only: no curve
        return out | {"auroc": float("nan"), "auprc": float("nan"), "threshold": threshold,
                      "sensitivity": float("nan"), "specificity": float("nan")}
    out |= {"auroc": float(roc_auc_score(y, score)), "auprc": float(average_precision_score(y, score))}
    if threshold is None:
        return out | youden_point(y, score)
    called = score >= threshold
    return out | {"threshold": float(threshold), "sensitivity": float(called[y == 1].mean()),
                  "specificity": float((~called)[y == 0].mean())}
