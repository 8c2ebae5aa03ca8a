"""The evaluation's zero-shot section: every 0/1 label with a prompt pair in the findings
lexicon scored by the model's text tower alone (``heads.zeroshot``), beside the linear disease
head the evaluation fits. Both are scored on the head's held-out studies (with the paired
DeLong test of the two); zero-shot, which trains on nothing, on every labelled study too."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from cmr_search.evals.efficiency import HeldOut
from cmr_search.findings.lexicon import FINDINGS
from cmr_search.heads.data import Bags
from cmr_search.heads.zeroshot import labelled_auroc, prompt_pair, prompt_scores
from cmr_search.metrics.stats import delong_test

__all__ = ["zero_shot_labels"]


def zero_shot_labels(encode: Callable[[list[str]], np.ndarray], bags: Bags, labels: dict[str, np.ndarray],
                     phenotypes: list[str], head: HeldOut | None, level: float = 0.95) -> dict:
    """Per phenotype with default prompts: the prompts, ``all`` (zero-shot AUROC over every
    labelled study) and, where the disease head ``head`` was fitted, ``held_out`` (zero-shot
    and head AUROC on its test studies, paired DeLong p); ``skipped``: labels without prompts.
    ``encode``: texts -> [N, D] by the text tower of the model of ``bags``."""
    named = [p for p in phenotypes if p in FINDINGS]
    out: dict = {"labels": [], "skipped": [p for p in phenotypes if p not in FINDINGS]}
    if not named:
        return out
    prompts = [prompt_pair(p) for p in named]
    text = np.asarray(encode([t for pair in prompts for t in pair]))  # one batch: the tower runs once
    studies = bags.studies.numpy()
    for i, (label, (positive, negative)) in enumerate(zip(named, prompts)):
        scores = prompt_scores(studies, text[2 * i], text[2 * i + 1])
        row = {"label": label, "positive": positive, "negative": negative,
               "all": labelled_auroc(labels[label], scores, level)}
        if head is not None and label in head.labels:
            j = head.labels.index(label)
            y, zs, pred = head.y[:, j], scores[head.test], head.pred[:, j]
            known = ~np.isnan(y)
            cases = int(y[known].sum())
            row["held_out"] = {
                "zero_shot": labelled_auroc(y, zs, level), "head": labelled_auroc(y, pred, level),
                # DeLong's paired test needs 2 cases and 2 controls (as the disease section)
                "p_delong": (delong_test(y[known].astype(int), zs[known], pred[known])
                             if 2 <= cases <= known.sum() - 2 else math.nan)}
        out["labels"].append(row)
    return out
