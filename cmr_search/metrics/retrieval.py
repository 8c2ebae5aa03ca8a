"""Retrieval metrics as pure functions over similarity matrices (queries x candidates).

Gains are per (query, candidate): binary 0/1 or graded (e.g. 1.0 exact, 0.5 near miss);
a candidate counts as relevant for precision and AP when its gain is > 0. ``exclude``
(bool [Q, C]) removes candidates from a query's pool, e.g. the query study itself: they are
ranked last and never relevant. Per-query metrics are returned as arrays [Q]; nDCG and AP
are NaN for a query with nothing relevant in its pool (undefined, so averages use nanmean).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "average_precision_at_k", "metrics_at_k", "ndcg_at_k", "precision_at_k", "rank_candidates",
    "recall_at_k", "retrieval_summary", "target_ranks",
]


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


def rank_candidates(sim: np.ndarray, k: int | None = None,
                    exclude: np.ndarray | None = None) -> np.ndarray:
    """Candidate indices [Q, k] (all C when k is None) by decreasing similarity. Ties keep
    the lower candidate index first, so a ranking never depends on the sort's whims;
    excluded candidates come last (NaN similarities after them)."""
    sim = _check_sim(sim)
    key = -sim
    if exclude is not None:
        key = np.where(_check_like(exclude, sim, "exclude").astype(bool), np.inf, key)
    if k is not None and 0 < k < key.shape[1]:
        # Sort only the candidates tied with or better than each row's k-th: a full sort of
        # [Q, C] dominates scan-to-scan time. Rows with NaNs in the top k, or ties so wide
        # that little is saved, take the full sort below (which this path equals).
        kth = np.partition(key, k - 1, axis=1)[:, k - 1:k]
        near = key <= kth
        counts = near.sum(axis=1)
        m = int(counts.max())
        if counts.min() >= k and m <= key.shape[1] // 2:
            idx = np.sort(np.argpartition(~near, m - 1, axis=1)[:, :m], axis=1)
            order = np.argsort(np.take_along_axis(key, idx, axis=1), axis=1, kind="stable")
            return np.take_along_axis(idx, order, axis=1)[:, :k]
    order = np.argsort(key, axis=1, kind="stable")
    return order if k is None else order[:, :k]


def metrics_at_k(top_gains: np.ndarray, pool_gains: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Precision, nDCG and AP at k of rankings already made: ``top_gains`` [Q, k] are the
    gains of each query's top k in rank order, ``pool_gains`` [Q, C] the gains of every
    candidate in its pool (excluded ones zero), from which the ideal DCG and the number
    relevant are taken. Returns {"precision", "ndcg", "ap", "relevant"}, each [Q]."""
    # an unknown gain (NaN) is no gain: it must not poison the sums
    top = np.nan_to_num(np.asarray(top_gains, np.float64)[:, :k])
    pool = np.nan_to_num(np.asarray(pool_gains, np.float64))
    if k < 1 or top.ndim != 2 or pool.ndim != 2 or top.shape[0] != pool.shape[0]:
        raise ValueError(f"expected k >= 1, top [Q, k] and pool [Q, C]; got k={k}, "
                         f"{top.shape} and {pool.shape}")
    if top.shape[1] < k:  # fewer candidates than k: the missing places retrieve nothing
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])))
    hit = top > 0
    n_rel = (pool > 0).sum(axis=1)
    precision = hit.sum(axis=1) / k

    discount = 1.0 / np.log2(np.arange(2, k + 2))  # rank i (1-based) -> 1 / log2(i + 1)
    dcg = top @ discount
    ideal = -np.sort(-pool, axis=1)[:, :k]
    ideal = np.pad(ideal, ((0, 0), (0, k - ideal.shape[1])))
    idcg = ideal @ discount
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(idcg > 0, dcg / idcg, np.nan)
        # AP@k = sum over hits at rank i of precision@i, over min(k, number relevant)
        prec_at_i = np.cumsum(hit, axis=1) / np.arange(1, k + 1)
        ap = np.where(n_rel > 0, (prec_at_i * hit).sum(axis=1) / np.minimum(k, n_rel), np.nan)
    return {"precision": precision, "ndcg": ndcg, "ap": ap, "relevant": n_rel}


def precision_at_k(sim: np.ndarray, gains: np.ndarray, k: int,
                   exclude: np.ndarray | None = None) -> np.ndarray:
    """Per query [Q]: the fraction of its top k that are relevant (gain > 0); the
    denominator is always k."""
    return _ranked_metrics(sim, gains, k, exclude)["precision"]


def ndcg_at_k(sim: np.ndarray, gains: np.ndarray, k: int,
              exclude: np.ndarray | None = None) -> np.ndarray:
    """Per query [Q]: DCG@k = sum_i gain_i / log2(i + 1) over ranks i = 1..k, divided by the
    DCG of the best possible top k drawn from all the query's candidates (graded gains
    allowed). NaN when no candidate has a gain."""
    return _ranked_metrics(sim, gains, k, exclude)["ndcg"]


def average_precision_at_k(sim: np.ndarray, gains: np.ndarray, k: int,
                           exclude: np.ndarray | None = None) -> np.ndarray:
    """Per query [Q]: AP@k = (1 / min(k, R)) * sum over relevant items at rank i <= k of
    precision@i, with R the number relevant (gain > 0) in the query's pool. Normalising by
    min(k, R), not R, makes a perfect top k score 1 even when R > k. NaN when R = 0."""
    return _ranked_metrics(sim, gains, k, exclude)["ap"]


def _ranked_metrics(sim, gains, k, exclude) -> dict[str, np.ndarray]:
    sim = _check_sim(sim)
    pool = _check_like(gains, sim, "gains").astype(np.float64)
    if exclude is not None:
        pool = np.where(_check_like(exclude, sim, "exclude").astype(bool), 0.0, pool)
    top = rank_candidates(sim, k, exclude)
    return metrics_at_k(np.take_along_axis(pool, top, axis=1), pool, k)


def _check_sim(sim) -> np.ndarray:
    sim = np.asarray(sim, np.float64)
    if sim.ndim != 2:
        raise ValueError(f"expected a similarity matrix [Q, C]; got shape {sim.shape}")
    return sim


def _check_like(a, sim: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != sim.shape:
        raise ValueError(f"{name} must have the similarity matrix's shape {sim.shape}; got {a.shape}")
    return a
