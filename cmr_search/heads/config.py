"""What a head is and how it trains: one typed config, saved on the head's card."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from cmr_search.core.exceptions import InputError

__all__ = ["KINDS", "TASKS", "HeadConfig"]

KINDS = ("linear", "mil")
TASKS = ("auto", "regression", "binary", "multilabel")


@dataclass(frozen=True)
class HeadConfig:
    """A head and its training (defaults measured in docs/BENCHMARKS.md, "Heads")."""

    kind: str = "mil"  # linear: on the study embedding; mil: gated attention over the view embeddings
    task: str = "auto"  # auto: binary when every value is 0/1 (multilabel for several labels), else regression
    hidden: int = 128  # attention hidden size of the MIL head
    dropout: float = 0.1
    layernorm: bool | None = None  # LayerNorm on the inputs; None: on for classification, off for regression
    lr: float = 5e-3
    weight_decay: float = 1e-4
    batch_size: int = 256  # studies per step (bags padded to the longest in the batch)
    max_epochs: int = 1000  # a bound for small sets; early stopping ends every run measured
    patience: int = 5  # validations without a better loss before stopping
    check_every: int = 50  # optimizer steps between validations, however short an epoch is
    min_delta: float = 0.002  # a validation loss must beat the best by this share to count
    huber_delta: float = 1.0  # on the standardised target (1 = one training-set SD)
    val_fraction: float = 0.15  # of patients
    test_fraction: float = 0.15  # of patients
    fraction: float = 1.0  # share of the training split used (data-efficiency curves)
    split_seed: int = 0  # the patient split
    seed: int = 0  # initialisation, batch order and the --fraction sample

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"head kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.task not in TASKS:
            raise InputError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if not 0 < self.fraction <= 1:
            raise InputError(f"--fraction must be in (0, 1]; got {self.fraction}")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise InputError("validation and test fractions must be in (0, 1) and leave patients for training")

    def to_dict(self) -> dict:
        """JSON-able."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        """From a card (unknown keys ignored, so older cards load)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
