"""Training a head on stored embeddings: many studies per step, early stopping on the
validation loss, metrics on the held-out test patients.

The paper's released code trains one study per step (batch size 1) and its MIL head's
parameters were never handed to the optimizer. Here bags of different sizes share a
batch (padding masked out of the attention), every parameter trains, and a head reaches
its early-stopping point in seconds (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cmr_search.heads.config import HeadConfig
from cmr_search.heads.data import Bags, LabelSet, patient_split, sample_fraction
from cmr_search.heads.model import build_head
from cmr_search.metrics.prediction import classification_metrics, regression_metrics, youden_point

__all__ = ["EarlyStopping", "TrainedHead", "fit_head", "head_loss", "metrics_for", "predict_outputs", "to_label_units"]


@dataclass
class TrainedHead:
    """A fitted head and everything its card records."""

    model: torch.nn.Module
    config: HeadConfig
    task: str
    labels: list[str]
    target: dict  # regression: {"mean", "std"} of the training labels (outputs are standardised)
    thresholds: dict  # classification: per label, the Youden threshold on the validation split
    metrics: dict  # {"val": {label: ...}, "test": {label: ...}}
    split: dict  # sizes and seeds
    seconds: float
    epochs: int
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def _pos_weight(y: torch.Tensor) -> torch.Tensor:
    """negatives / positives per label in the training rows (1 where a label has none)."""
    known = ~torch.isnan(y)
    pos = torch.where(known, y, 0).sum(0)
    neg = known.sum(0) - pos
    return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))


def head_loss(task: str, outputs: torch.Tensor, y: torch.Tensor, huber_delta: float,
              pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Huber (regression, standardised targets) or BCE with pos_weight, averaged over the
    known labels only (a missing label, NaN, adds nothing)."""
    known = ~torch.isnan(y)
    target = torch.where(known, y, torch.zeros_like(y))
    if task == "regression":
        per = F.huber_loss(outputs, target, delta=huber_delta, reduction="none")
    else:
        per = F.binary_cross_entropy_with_logits(outputs, target, pos_weight=pos_weight, reduction="none")
    return (per * known).sum() / known.sum().clamp(min=1)


class EarlyStopping:
    """Keeps the best weights seen; stops after ``patience`` validations in a row that do
    not beat the best counted loss by the share ``min_delta``."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.counted, self.state, self.stale = float("inf"), float("inf"), None, 0

    def update(self, loss: float, model: torch.nn.Module) -> bool:
        """Record one validation loss; True when training should stop."""
        if loss < self.best:  # keep the best weights seen ...
            self.best, self.state = loss, copy.deepcopy(model.state_dict())
        if loss < self.counted * (1 - self.min_delta):  # ... but only a real gain buys more patience
            self.counted, self.stale = loss, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


def _batches(bags: Bags, idx: np.ndarray, size: int):
    for i in range(0, len(idx), size):
        t = torch.from_numpy(idx[i : i + size])
        mask = bags.mask[t]
        width = max(int(mask.sum(1).max()), 1)  # trim the padding this batch does not need
        yield t, bags.studies[t], bags.views[t, :width], mask[:, :width]


@torch.no_grad()
def predict_outputs(model: torch.nn.Module, bags: Bags, idx: np.ndarray | None = None,
                    batch: int = 1024) -> tuple[np.ndarray, list[np.ndarray]]:
    """Raw outputs [n, K] (standardised values or logits) and each study's attention over
    its real views (empty for the linear head)."""
    idx = np.arange(len(bags)) if idx is None else np.asarray(idx, np.int64)
    model.eval()
    outs, attention = [], []
    for _, studies, views, mask in _batches(bags, idx, batch):
        out, att = model(studies, views, mask)
        outs.append(out)
        for i in range(len(mask)):
            attention.append(att[i][mask[i]].numpy() if att is not None else np.empty(0, np.float32))
    return (torch.cat(outs).numpy() if outs else np.empty((0, 0), np.float32)), attention


def to_label_units(task: str, outputs: np.ndarray, target: dict) -> np.ndarray:
    if task == "regression":
        return outputs * target["std"] + target["mean"]
    return 1 / (1 + np.exp(-outputs))


def metrics_for(task: str, names: list[str], y: np.ndarray, pred: np.ndarray,
                thresholds: dict | None = None) -> dict:
    """Per label: regression metrics, or classification metrics at the given thresholds
    (their own Youden point where none is given)."""
    out = {}
    for j, name in enumerate(names):
        known = ~np.isnan(y[:, j])
        if not known.any():
            continue
        if task == "regression":
            out[name] = regression_metrics(y[known, j], pred[known, j])
        else:
            out[name] = classification_metrics(y[known, j], pred[known, j], (thresholds or {}).get(name))
    return out


def fit_head(bags: Bags, labels: LabelSet, cfg: HeadConfig, log=None) -> TrainedHead:
    """Split by patient, train with early stopping, score validation and test."""
    started = time.perf_counter()
    task = labels.task
    if cfg.kind == "linear":  # halves a step's time (measured): batches no longer copy the view bags
        bags = bags.studies_only()
    train, val, test = patient_split(bags, labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    full_train = len(train)
    train = sample_fraction(bags, labels, train, cfg.fraction, cfg.seed)
    y = torch.from_numpy(labels.values.astype(np.float32))
    target = {}
    if task == "regression":
        known = y[train][~torch.isnan(y[train])]
        target = {"mean": float(known.mean()), "std": float(known.std()) if len(known) > 1 else 1.0}
        target["std"] = target["std"] or 1.0
        y = (y - target["mean"]) / target["std"]
    pos_weight = _pos_weight(y[train]) if task != "regression" else None
    torch.manual_seed(cfg.seed)
    model = build_head(cfg, task, bags.studies.shape[1], len(labels.names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    # validate every check_every optimizer steps: a large archive converges within an epoch
    # or two, and a small one (an epoch of one step) needs as many steps between checks;
    # patience counts validations
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    last = cfg.max_epochs * steps_per_epoch
    early = EarlyStopping(cfg.patience, cfg.min_delta)
    best_epoch, history, epoch, step, total, seen, stop = 0, [], 0, 0, 0.0, 0, False
    for epoch in range(1, cfg.max_epochs + 1):
        for t, studies, views, mask in _batches(bags, rng.permutation(train), cfg.batch_size):
            model.train()
            out, _ = model(studies, views, mask)
            loss = head_loss(task, out, y[t], cfg.huber_delta, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen, step = total + float(loss.detach()) * len(t), seen + len(t), step + 1
            if step % cfg.check_every and step != last:
                continue
            val_out, _ = predict_outputs(model, bags, val)
            val_loss = float(head_loss(task, torch.from_numpy(val_out), y[val], cfg.huber_delta, pos_weight))
            history.append({"epoch": epoch, "step": step, "train_loss": total / max(seen, 1), "val_loss": val_loss})
            total, seen = 0.0, 0
            if log:
                log(history[-1])
            if val_loss < early.best:
                best_epoch = epoch
            stop = early.update(val_loss, model)
            if stop:
                break
        if stop:
            break
    model.load_state_dict(early.state)
    model.eval()
    values = labels.values
    val_pred = to_label_units(task, predict_outputs(model, bags, val)[0], target)
    thresholds = {}
    if task != "regression":
        for j, name in enumerate(labels.names):
            known = ~np.isnan(values[val, j])
            if 0 < values[val, j][known].sum() < known.sum():
                thresholds[name] = youden_point(values[val, j][known], val_pred[known, j])["threshold"]
    test_pred = to_label_units(task, predict_outputs(model, bags, test)[0], target)
    metrics = {"val": metrics_for(task, labels.names, values[val], val_pred, thresholds),
               "test": metrics_for(task, labels.names, values[test], test_pred, thresholds)}
    split = {"split_seed": cfg.split_seed, "seed": cfg.seed, "fraction": cfg.fraction, "train_studies": len(train),
             "train_studies_full": full_train, "val_studies": len(val), "test_studies": len(test),
             "train_patients": len(np.unique(bags.patient_keys[train]))}
    return TrainedHead(model, cfg, task, list(labels.names), target, thresholds, metrics, split,
                       time.perf_counter() - started, epoch, best_epoch, history)
