"""Clusters of study embeddings: HDBSCAN on a PCA projection of the unit vectors, with the
studies nearest each cluster's centre as exemplars; how well clusters and neighbourhoods
follow the phenotype labels (and not the view), and a 2-D map for the eye."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ClusterResult", "cluster_agreement", "cluster_embeddings", "embedding_map", "main_phenotype",
           "neighbour_agreement"]


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


def cluster_agreement(clusters: np.ndarray, classes: np.ndarray) -> dict:
    """Adjusted Rand index and purity of clusters against known classes. Noise (-1) counts
    as one more cluster for the ARI over all points and is left out of the ARI over clustered
    points and of the purity (the share of clustered points in their cluster's majority class)."""
    from sklearn.metrics import adjusted_rand_score

    clusters, classes = np.asarray(clusters), np.asarray(classes)
    if clusters.shape != classes.shape or clusters.ndim != 1:
        raise ValueError(f"expected two equal-length 1-d arrays; got {clusters.shape} and {classes.shape}")
    kept = clusters >= 0
    out = {"n": len(clusters), "clusters": len(set(clusters[kept].tolist())), "noise": int((~kept).sum()),
           "ari": float(adjusted_rand_score(classes, clusters)) if len(clusters) else float("nan")}
    if not kept.any():
        return out | {"ari_clustered": float("nan"), "purity": float("nan")}
    majority = sum(np.unique(classes[kept & (clusters == c)], return_counts=True)[1].max()
                   for c in set(clusters[kept].tolist()))
    return out | {"ari_clustered": float(adjusted_rand_score(classes[kept], clusters[kept])),
                  "purity": float(majority / kept.sum())}


def main_phenotype(labels: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """One class per study: its rarest positive phenotype (the most specific finding), or
    "none"; a study with no known value of any of them is "unknown"."""
    prevalence = {n: np.nanmean(np.asarray(labels[n], np.float64)) for n in names}
    order = sorted(names, key=lambda n: (prevalence[n], n))
    n_rows = len(np.asarray(labels[names[0]])) if names else 0
    out = np.full(n_rows, "none", dtype=object)
    known = np.zeros(n_rows, bool)
    for name in reversed(order):  # the rarest is written last and wins
        v = np.asarray(labels[name], np.float64)
        known |= ~np.isnan(v)
        out[v == 1] = name
    out[~known] = "unknown"
    return out


def neighbour_agreement(vectors: np.ndarray, groups: np.ndarray, k: int = 10) -> dict:
    """How often a vector's k nearest others (cosine) share its group, against chance (the
    same share for neighbours drawn at random). For view embeddings grouped by view, a value
    far above chance means the space is organised by view plane, not by the heart."""
    x = np.asarray(vectors, np.float32)
    groups = np.asarray(groups)
    n = len(x)
    if n < 2:
        return {"k": k, "same_group": float("nan"), "chance": float("nan")}
    k = min(k, n - 1)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    same = float((groups[nearest] == groups[:, None]).mean())
    _, counts = np.unique(groups, return_counts=True)
    chance = float(((counts * (counts - 1)).sum()) / (n * (n - 1)))
    return {"k": k, "same_group": same, "chance": chance}


def embedding_map(vectors: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates of unit embeddings: openTSNE on cosine distance (perplexity scaled
    down for small sets), or the first two PCA axes."""
    x = np.asarray(vectors, np.float32)
    if len(x) < 5 or method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, len(x), x.shape[1])
        xy = PCA(n_components=k, random_state=seed).fit_transform(x) if len(x) > 1 else np.zeros((len(x), k))
        return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1]))).astype(np.float32)
    from openTSNE import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return np.asarray(TSNE(perplexity=perplexity, metric="cosine", random_state=seed, n_jobs=1,
                           verbose=False).fit(x), np.float32)
