"""What ``cmr eval`` measures and how: one typed config, written into ``metrics.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cmr_search.core.exceptions import InputError

__all__ = ["EvalConfig"]


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (defaults keep the demo cohort under 5 minutes on 2 cores)."""

    k: int = 10  # neighbours and results scored per query
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # shares of the training labels (data efficiency)
    seeds: int = 5  # replicates per fraction
    head_kind: str = "linear"  # heads fitted by the evaluation (the registered ones are reported as they are)
    test_fraction: float = 0.3  # of patients: held out of every head the evaluation fits
    val_fraction: float = 0.15
    split_seed: int = 0
    baseline: str = "random"  # "random": the encoder's architecture at random init; "none": skip
    baseline_seed: int = 0
    hfref_below: float = 40.0  # LVEF % under which a study counts as HFrEF
    map_method: str = "tsne"  # 2-D map of the embeddings: tsne (openTSNE) or pca
    min_cluster_size: int = 10  # HDBSCAN
    level: float = 0.95  # confidence level of the DeLong intervals

    def __post_init__(self):
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise InputError(f"fractions must lie in (0, 1]; got {self.fractions}")
        if self.seeds < 1 or self.k < 1:
            raise InputError("seeds and k must be at least 1")
        if self.baseline not in ("random", "none"):
            raise InputError(f"baseline {self.baseline!r} is not one of random, none")
        if self.map_method not in ("tsne", "pca"):
            raise InputError(f"map method {self.map_method!r} is not one of tsne, pca")
        if not 0 < self.level < 1:
            raise InputError(f"confidence level must lie in (0, 1); got {self.level}")

    def to_dict(self) -> dict:
        """JSON-able."""
        return asdict(self)
