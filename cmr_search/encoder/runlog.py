"""What a training run writes as it goes: one row per step in ``metrics.csv`` (kept exact
across a kill and a resume) and the progress bar's words. Both trainers use it
(``train.py``, ``train_text.py``)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

__all__ = ["METRIC_FIELDS", "metric_row", "progress_text", "step_optimizer", "trim_metric_rows", "write_metric_rows"]

METRIC_FIELDS = ["step", "loss", "raw", "pair", "study", "v2t", "t2v", "hard", "hard_err", "match", "lr", "temperature",
                 "seconds", "val_R@1", "val_R@5", "val_R@10", "val_median_rank", "val_pool"]


def step_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """Clip the gradient norm, take the optimizer step, clear the gradients."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def metric_row(out: dict[str, torch.Tensor], step: int, optimizer: torch.optim.Optimizer, scale: torch.Tensor,
               elapsed: float) -> dict:
    """A step's row of ``metrics.csv``: its named losses, the peak learning rate, the
    temperature (1 / ``scale``) and the training seconds so far."""
    row = {k: round(float(v.detach()), 5) for k, v in out.items()}
    return row | {"step": step, "lr": max(g["lr"] for g in optimizer.param_groups),
                  "temperature": round(1.0 / float(scale.detach()), 5), "seconds": round(elapsed, 1)}


def write_metric_rows(path: Path, rows: list[dict], mode: str = "a") -> None:
    """Append a run's metric rows to its ``metrics.csv`` (``mode="w"``: rewrite it)."""
    new = mode == "w" or not path.exists()
    with path.open(mode, newline="") as fp:
        writer = csv.DictWriter(fp, fieldnames=METRIC_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in METRIC_FIELDS} for row in rows)


def trim_metric_rows(path: Path, step: int) -> None:
    """Drop the rows logged after ``step``: a kill loses them with the steps since the last
    checkpoint, and the resumed run logs those steps again, each once."""
    if path.exists():
        with path.open(newline="") as fp:
            rows = [r for r in csv.DictReader(fp) if int(r["step"]) <= step]
        write_metric_rows(path, rows, mode="w")


def progress_text(loss: float, val: dict) -> str:
    """The progress bar's words: the loss, and the validation R@5 with its pool and chance
    (an R@5 of 1.00 in a pool of 4 is no news)."""
    if not val or "pool" not in val:
        return f"loss {loss:.3f}"
    pool = val["pool"]
    return f"loss {loss:.3f} val R@5 {val['R@5']:.2f} of {pool} studies (chance {min(5, pool) / pool:.2f})"
