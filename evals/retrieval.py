"""Retrieval metrics as pure functions over similarity matrices (queries x candidates)."""

from __future__ import annotations

import numpy as np

__all__ = ["recall_at_k", "retrieval_summary", "target_ranks"]


def target_ranks(sim: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each query's target candidate (ties count against the target)."""
    sim = np.asarray(sim, dtype=np.float64)
    targets = np.asarray(targets)
    if sim.ndim != 2 or targets.shape != (sim.shape[0],):
        raise ValueError(f"expected sim [Q, C] and targets [Q]; got {sim.shape} and {targets.shape}")
    own = sim[np.arange(sim.shape[0]), targets]
    return (sim >= own[:, None]).sum(axis=1)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose target is within the top k."""
    return float(np.mean(np.asarray(ranks) <= k)) if len(ranks) else float("nan")


def retrieval_summary(sim: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Recall@k for each k, the median rank and the candidate pool size."""
    ranks = target_ranks(sim, targets)
    out = {f"R@{k}": recall_at_k(ranks, k) for k in ks}
    out["median_rank"] = float(np.median(ranks)) if len(ranks) else float("nan")
    out["pool"] = int(np.asarray(sim).shape[1])
    return out
