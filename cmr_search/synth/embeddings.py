"""Synthetic view and study embeddings with a known signal, for the heads' tests and
benchmark (shaped like the UK Biobank LVEF task: 4-15 views per study, 512-d).

Each study has latent factors z; LVEF and a rare thrombus label are functions of z. Each
view type projects z through its own loadings (short-axis slices carry LVEF best, the
4-chamber view the apex, so attention over views has something to find), adds a strong
view-identity direction (real embeddings cluster by view too) and noise; vectors are unit
length and the study embedding is the normalised mean of its views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

__all__ = ["EmbeddingCohort", "embedding_cohort"]

LONG_AXIS = ["4CH", "3CH", "2CH"]
FACTORS = 8
# how much of z0 (LVEF) and z1 (apex) each view type carries
GAIN = {"4CH": (0.4, 1.0), "3CH": (0.3, 0.2), "2CH": (0.4, 0.5), "SAX": (1.0, 0.1)}


@dataclass
class EmbeddingCohort:
    """Studies as padded view bags plus their labels table."""

    study_uids: list[str]
    patient_keys: np.ndarray
    views: np.ndarray  # [N, V, D] float32, zero-padded
    mask: np.ndarray  # [N, V] bool
    view_names: list[list[dict]]  # per study: view, slice_index, clip_id
    studies: np.ndarray  # [N, D]
    labels: pa.Table  # study_uid, lvef, reduced_lvef, lv_thrombus


def embedding_cohort(n: int, seed: int = 0, dim: int = 512, min_views: int = 4, max_views: int = 15,
                     noise: float = 1.0, lvef_noise: float = 0.0) -> EmbeddingCohort:
    """``n`` studies of about 0.8 n patients (some have two studies). ``lvef_noise`` (SD,
    points) is the measurement error of the LVEF label: the floor of any head's MAE is
    about 0.8 of it."""
    rng = np.random.default_rng(seed)
    loadings = np.random.default_rng(1000).standard_normal((len(GAIN), FACTORS, dim)).astype(np.float32) / np.sqrt(dim)
    identity = np.random.default_rng(1001).standard_normal((len(GAIN), dim)).astype(np.float32) / np.sqrt(dim)
    z = rng.standard_normal((n, FACTORS)).astype(np.float32)
    lvef = np.clip(57 + 11 * z[:, 0], 15, 75)
    measured = np.clip(lvef + lvef_noise * rng.standard_normal(n), 10, 80).round(1)
    p_thrombus = 1 / (1 + np.exp(-(-3.0 + 1.8 * z[:, 1] - 0.08 * (lvef - 57))))
    thrombus = rng.random(n) < p_thrombus
    counts = rng.integers(min_views, max_views + 1, n)
    width = int(counts.max())
    views = np.zeros((n, width, dim), np.float32)
    mask = np.arange(width)[None, :] < counts[:, None]
    names: list[list[dict]] = []
    types = list(GAIN)
    for i in range(n):
        kinds = (LONG_AXIS + ["SAX"] * (counts[i] - 3))[: counts[i]]
        row = []
        for j, kind in enumerate(kinds):
            t = types.index(kind)
            g0, g1 = GAIN[kind]
            signal = (z[i] * np.array([g0, g1] + [0.3] * (FACTORS - 2), np.float32)) @ loadings[t]
            row.append({"view": kind, "slice_index": j - 3 if kind == "SAX" else None, "clip_id": f"syn{seed}-{i}-{j}"})
            views[i, j] = 3 * signal + 2 * identity[t]
        names.append(row)
    views += noise * mask[..., None] * rng.standard_normal(views.shape).astype(np.float32) / np.sqrt(dim)
    views /= np.maximum(np.linalg.norm(views, axis=2, keepdims=True), 1e-12)
    studies = views.sum(1)
    studies /= np.linalg.norm(studies, axis=1, keepdims=True)
    patient = np.where(rng.random(n) < 0.25, rng.integers(0, max(n // 8, 1), n), np.arange(n) + n)
    uids = [f"2.25.{seed}.{i}" for i in range(n)]
    labels = pa.table({"study_uid": uids, "lvef": measured, "reduced_lvef": (measured < 40).astype(np.int64),
                       "lv_thrombus": thrombus.astype(np.int64)})
    return EmbeddingCohort(uids, np.array([f"pk{p}" for p in patient], dtype=object), views, mask, names,
                           studies, labels)
