"""Synthetic embeddings and the timing helpers that the search benchmarks share (numpy
only, so that benchmarks/gpu.py runs where lancedb is not installed)."""

from __future__ import annotations

import time

import numpy as np

DIM = 512


def embeddings(n: int, seed: int, clusters: int = 2000) -> np.ndarray:
    """Unit vectors from a mixture: Zipf-sized clusters, each with its own spread, around
    centres that share a low-rank structure (like real embeddings, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((64, DIM)).astype(np.float32)
    centres = rng.standard_normal((clusters, 64)).astype(np.float32) @ basis / 8
    centres += 0.5 * rng.standard_normal((clusters, DIM)).astype(np.float32)
    weights = 1 / np.arange(1, clusters + 1) ** 0.8
    label = rng.choice(clusters, n, p=weights / weights.sum())
    spread = rng.uniform(0.3, 0.9, clusters).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for i in range(0, n, 100_000):
        lab = label[i : i + 100_000]
        x = centres[lab] + spread[lab, None] * rng.standard_normal((len(lab), DIM)).astype(np.float32)
        out[i : i + 100_000] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row numbers by inner product."""
    out = np.empty((len(q), k), np.int64)
    for i in range(0, len(q), 100):
        s = q[i : i + 100] @ x.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.take_along_axis(s, part, 1).argsort(1)[:, ::-1]
        out[i : i + 100] = np.take_along_axis(part, order, 1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top-k among the found top-k."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def latency(fn, queries: np.ndarray) -> tuple[float, float, list]:
    """p50 and p99 (ms) of single-query calls, and their results."""
    results, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(fn(q))
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3), results


def qps(fn, queries: np.ndarray, batch: int = 64) -> float:
    """Queries per second in batches."""
    t0 = time.perf_counter()
    for i in range(0, len(queries), batch):
        fn(queries[i : i + batch])
    return len(queries) / (time.perf_counter() - t0)
