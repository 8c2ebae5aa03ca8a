"""Heads fitted by the evaluation: the same patient split for every model, a share of the
training labels, several seeds (the paper's Fig. 3a: how much labelling a pre-trained
embedding saves), and the held-out predictions the statistics are computed on."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from cmr_search.heads.config import HeadConfig
from cmr_search.heads.data import Bags, LabelSet, patient_split
from cmr_search.heads.train import fit_head, predict_outputs, to_label_units

__all__ = ["HeldOut", "align_bags", "aligned_columns", "fit_held_out", "head_tasks", "label_efficiency", "numeric_columns",
           "phenotype_columns"]


@dataclass
class HeldOut:
    """One fitted head's predictions on the test split, in label units ([n, L])."""

    model: str  # "contrastive" or "baseline"
    labels: list[str]
    test: np.ndarray  # row indices into the bags
    y: np.ndarray  # [n, L], NaN where missing
    pred: np.ndarray  # [n, L]: LVEF % or probabilities
    fraction: float
    seed: int
    train_studies: int


def numeric_columns(table) -> dict[str, np.ndarray]:
    """Every integer or floating column of a label table (pyarrow, with ``study_uid``) as
    float64, nulls as NaN."""
    return {name: np.array(table[name].to_pylist(), dtype=np.float64) for name in table.column_names
            if name != "study_uid" and (pa.types.is_integer(table[name].type) or pa.types.is_floating(table[name].type))}


def aligned_columns(table, study_uids: list[str]) -> dict[str, np.ndarray]:
    """Every numeric column of a label table aligned with ``study_uids`` (NaN where a study
    has no row; the last row of a study wins, as at import)."""
    row = {u: i for i, u in enumerate(table["study_uid"].to_pylist())}
    take = np.array([row.get(u, -1) for u in study_uids])
    return {name: np.where(take >= 0, values[np.maximum(take, 0)], np.nan)
            for name, values in numeric_columns(table).items()}


def head_tasks(store, bags: Bags, lvef: bool, phenotypes: list[str], labels_path=None) -> dict[str, LabelSet]:
    """The evaluation's head tasks for these bags: "lvef" (regression) where asked, "disease"
    (one multi-label head over the phenotypes) where there are any."""
    from cmr_search.heads.data import load_labels

    tasks = {}
    if lvef:
        tasks["lvef"] = load_labels(store, bags, ["lvef"], labels_path, "regression")
    if phenotypes:
        tasks["disease"] = load_labels(store, bags, phenotypes, labels_path, "multilabel")
    return tasks


def phenotype_columns(table) -> list[str]:
    """The 0/1 columns of a label table (a pyarrow table with ``study_uid``): the phenotypes."""
    out = []
    for name, values in numeric_columns(table).items():
        known = values[~np.isnan(values)]
        if len(known) and np.isin(known, (0.0, 1.0)).all() and 0 < known.sum():
            out.append(name)
    return out


def align_bags(bags: dict[str, Bags]) -> dict[str, Bags]:
    """The studies every model has embedded, in one order, so that a patient split and the
    paired tests see the same studies row for row."""
    common = sorted(set.intersection(*(set(b.study_uids) for b in bags.values())))
    out = {}
    for name, b in bags.items():
        row = {u: i for i, u in enumerate(b.study_uids)}
        out[name] = b.subset(np.array([row[u] for u in common], np.int64))
    return out


def fit_held_out(model: str, bags: Bags, labels: LabelSet, cfg: HeadConfig) -> HeldOut:
    """Fit one head and predict its own test split (the split is the config's, so every model
    fitted with the same ``split_seed`` on aligned bags is scored on the same studies)."""
    trained = fit_head(bags, labels, cfg)
    _, _, test = patient_split(bags, labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    pred = to_label_units(trained.task, predict_outputs(trained.model, bags, test)[0], trained.target)
    return HeldOut(model, list(labels.names), test, labels.values[test], pred, cfg.fraction, cfg.seed,
                   trained.split["train_studies"])


def label_efficiency(bags: dict[str, Bags], labels: LabelSet, cfg: HeadConfig, fractions: tuple[float, ...],
                     seeds: int, progress=None) -> list[HeldOut]:
    """Every model x fraction x seed; the seed draws the training share and the initialisation,
    the split stays fixed. ``progress`` is called once per fit."""
    out = []
    for fraction in fractions:
        for seed in range(seeds):
            for name, b in bags.items():
                out.append(fit_held_out(name, b, labels, replace(cfg, fraction=fraction, seed=seed)))
                if progress:
                    progress()
    return out
