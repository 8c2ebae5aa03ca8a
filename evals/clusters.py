"""Clusters of study embeddings: HDBSCAN on a PCA projection of the unit vectors, with the
studies nearest each cluster's centre as exemplars."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ClusterResult", "cluster_embeddings"]


@dataclass
class ClusterResult:
    """Labels per study (-1 = noise) and, per cluster, its size and exemplar row indices."""

    labels: np.ndarray
    sizes: dict[int, int] = field(default_factory=dict)
    exemplars: dict[int, list[int]] = field(default_factory=dict)

    @property
    def noise(self) -> int:
        return int((self.labels < 0).sum())


def cluster_embeddings(vectors: np.ndarray, min_cluster_size: int = 10, dims: int = 32, n_exemplars: int = 5,
                       seed: int = 0) -> ClusterResult:
    """HDBSCAN over unit 512-d embeddings. Density estimates in 512 dimensions are flat, so
    the vectors are first projected on their ``dims`` main PCA axes (euclidean distance
    there ~ cosine distance on the sphere); exemplars are the members most similar to the
    cluster's normalised mean in the full space."""
    import hdbscan
    from sklearn.decomposition import PCA

    x = np.asarray(vectors, np.float32)
    if len(x) < max(min_cluster_size, 3):
        return ClusterResult(np.full(len(x), -1, np.int64))
    k = min(dims, x.shape[1], len(x) - 1)
    reduced = PCA(n_components=k, random_state=seed).fit_transform(x)
    labels = hdbscan.HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min(min_cluster_size, 5),
                             core_dist_n_jobs=1).fit_predict(reduced).astype(np.int64)
    result = ClusterResult(labels)
    for c in sorted(set(labels.tolist()) - {-1}):
        members = np.flatnonzero(labels == c)
        centre = x[members].mean(0)
        centre /= np.linalg.norm(centre) + 1e-12
        order = np.argsort(-(x[members] @ centre), kind="stable")[:n_exemplars]
        result.sizes[c] = len(members)
        result.exemplars[c] = members[order].tolist()
    return result
