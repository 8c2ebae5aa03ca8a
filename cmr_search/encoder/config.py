"""Encoder configurations: named JSON files in ``encoder/configs/`` -> typed dataclasses.

A model size is a file, never a code edit; a checkpoint carries its resolved config, so
loading one rebuilds exactly the model that was trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cmr_search.core.exceptions import InputError
from cmr_search.encoder.mvit import MViTConfig
from cmr_search.encoder.text import TextConfig
from cmr_search.encoder.video import PreprocessConfig

__all__ = [
    "CONFIG_DIR",
    "AlignConfig",
    "AugmentConfig",
    "EncoderConfig",
    "LossConfig",
    "PoolingConfig",
    "TextAlignConfig",
    "TrainConfig",
    "list_configs",
    "load_config",
    "load_text_align_config",
]

CONFIG_DIR = Path(__file__).parent / "configs"
#: recipes of ``cmr train-text`` (``TextAlignConfig``)
TEXT_CONFIG_DIR = CONFIG_DIR / "text"
AUGMENT_ON = ("auto", "loader", "device")


@dataclass
class PoolingConfig:
    """Gated-attention pooling of a study's views into the study embedding."""

    hidden: int = 128  # attention hidden size
    dropout: float = 0.0


@dataclass
class LossConfig:
    """Asymmetric bidirectional InfoNCE (DESIGN.md)."""

    lam: float = 0.75  # weight of view->report against report->view
    temperature: float = 0.1  # initial τ (logits = v·u / τ)
    learn_temperature: bool = True  # τ trains (clamped at 0.01)
    flood: float = 0.05  # flooding level b (paper: 0.05); 0 turns it off
    study_weight: float = 1.0  # weight of the pooled-study term
    hard_weight: float = 1.0  # weight of the claim-vs-counterfactuals term (text.counterfactuals)
    # weight of claim matching: every claim and rewrite against every study of the batch,
    # with the findings parser's targets (encoder/loss.py); needs text.counterfactuals
    match_weight: float = 0.0


@dataclass
class AugmentConfig:
    """Clip augmentation, the same for every frame of a clip; none at evaluation."""

    scale: tuple[float, float] = (0.75, 1.0)  # random resized crop: area fraction
    ratio: tuple[float, float] = (0.9, 1.1)  # ... aspect ratio
    rotate_deg: float = 10.0  # uniform in ±rotate_deg
    flip: bool = False  # left-right flip mirrors anatomy: off by default
    brightness: float = 0.1  # additive, fraction of the 0..255 range
    contrast: float = 0.2  # multiplicative, ±fraction
    gamma: float = 0.2  # exponent in [1 - gamma, 1 + gamma]
    noise: float = 0.02  # Gaussian noise std, fraction of the range


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of ``cmr train-encoder``."""

    studies_per_batch: int = 16  # reports (and negatives) per step
    views_per_study: int = 4  # clips sampled per study per step, all paired with its report
    # fraction of steps whose studies all contribute the same view type (4CH, 3CH, 2CH or SAX);
    # with little data and time, mixed-view batches let view identity drown the report signal
    # (measured: docs/encoder.md), so the CPU configuration stratifies every batch
    stratify_views: float = 0.0
    accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate of the vision tower, pooling and projections
    text_lr: float = 3e-5  # peak learning rate of the unfrozen BERT layers
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_steps: int = 2000  # cosine decay to min_lr_ratio x lr over this many steps
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 autocast on CUDA; CPU always trains in float32
    checkpoint_every: int = 100  # steps between checkpoints (model + optimizer + RNG)
    eval_every: int = 100  # steps between validation retrieval metrics
    val_fraction: float = 0.15  # patients held out for validation
    seed: int = 0
    # seed of the patient split; None = ``seed``. Fixed across training seeds, every seed
    # is scored on the same held-out patients, so their spread is the training's alone
    split_seed: int | None = None
    num_workers: int = 0  # DataLoader worker processes
    # where clips are augmented: "loader" (its workers, on the CPU), "device" (uint8 clips go
    # to the training device, which augments them) or "auto": the device when it is a GPU,
    # whose loader would otherwise move 12x the bytes and spend CPU cores on the warp
    augment_on: str = "auto"


@dataclass
class AlignConfig:
    """Text alignment after the joint training (``encoder/align.py``): the video tower and
    the study pooling locked, their embeddings of the training studies computed once, and
    the text tower's trainable part alone trained against them for ``max_steps`` more
    steps. A step costs the text tower only, a tenth of a joint step on a CPU."""

    max_steps: int = 0  # 0: no alignment phase
    studies_per_batch: int = 64  # reports per step (the cached embeddings are their negatives)
    lr: float = 1e-4  # peak learning rate of the text tower's trainable part
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05


@dataclass
class EncoderConfig:
    """The whole contrastive model and its training recipe."""

    name: str = "custom"
    dim: int = 512  # shared embedding width
    vision: MViTConfig = field(default_factory=MViTConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    text: TextConfig = field(default_factory=TextConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def __post_init__(self) -> None:
        if self.preprocess.crop != self.vision.crop_size:
            raise InputError(f"preprocess.crop ({self.preprocess.crop}) must equal vision.crop_size "
                             f"({self.vision.crop_size}): the model sees what preprocessing makes")
        if self.train.augment_on not in AUGMENT_ON:
            raise InputError(f"train.augment_on is {self.train.augment_on!r}; use one of {', '.join(AUGMENT_ON)}")
        if self.align.max_steps and self.text.freeze_projection:
            raise InputError("align.max_steps trains the text tower, which text.freeze_projection locks; "
                             "set freeze_projection to false or align.max_steps to 0")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what a checkpoint stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        """Build from a dict; unknown keys are an error (a typo must not pass silently)."""
        parts = {"vision": MViTConfig, "preprocess": PreprocessConfig, "text": TextConfig,
                 "pooling": PoolingConfig, "loss": LossConfig, "augment": AugmentConfig, "train": TrainConfig,
                 "align": AlignConfig}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown encoder config keys: {', '.join(sorted(unknown))}")
        kwargs = {}
        for key, value in data.items():
            if key in parts:
                allowed = {f.name for f in fields(parts[key])}
                bad = set(value) - allowed
                if bad:
                    raise InputError(f"unknown keys in encoder config section '{key}': {', '.join(sorted(bad))}")
                value = parts[key](**{k: tuple(v) if isinstance(v, list) and key == "augment" else v
                                      for k, v in value.items()})
            kwargs[key] = value
        return cls(**kwargs)


def list_configs() -> list[str]:
    """Names of the packaged configurations."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> EncoderConfig:
    """A packaged configuration by name (``mvit_xs_cpu``) or a JSON file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise InputError(f"no encoder config '{name_or_path}'; packaged ones: {', '.join(list_configs())}")
    data = json.loads(path.read_text())
    data.setdefault("name", path.stem)
    return EncoderConfig.from_dict(data)


@dataclass
class TextAlignConfig:
    """A recipe of ``cmr train-text`` (``encoder/train_text.py``): which text tower, how much
    of it trains, the loss, and the optimisation against a locked model's stored embeddings.
    Its sections mean what they mean in ``EncoderConfig``; the video side is whatever model
    is aligned to, read from the store."""

    name: str = "custom"
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    studies_per_batch: int = 32  # reports per step; the other studies' stored vectors are their negatives
    views_per_study: int = 2  # stored view embeddings paired with each report per step
    stratify_views: float = 1.0  # fraction of steps drawing one view type (TrainConfig.stratify_views)
    lr: float = 1e-4  # peak learning rate of the trainable BERT layers
    proj_lr: float = 1e-3  # ... of the projection (new, so it starts from scratch) and the temperature
    weight_decay: float = 0.05
    warmup_steps: int = 20
    max_steps: int = 400
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_every: int = 50
    val_fraction: float = 0.15  # patients held out (the same split as a joint run of the same seed)
    seed: int = 0
    split_seed: int | None = None
    # memory for the locked layers' states of the texts drawn (about 300 kB per study);
    # past it, states are computed at each use: slower steps, the same results
    trunk_cache_gb: float = 4.0

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what a text-aligned model's config records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TextAlignConfig:
        """Build from a dict; unknown keys are an error."""
        parts = {"text": TextConfig, "loss": LossConfig}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown text alignment config keys: {', '.join(sorted(unknown))}")
        kwargs = {}
        for key, value in data.items():
            if key in parts:
                bad = set(value) - {f.name for f in fields(parts[key])}
                if bad:
                    raise InputError(f"unknown keys in text alignment config section '{key}': {', '.join(sorted(bad))}")
                value = parts[key](**value)
            kwargs[key] = value
        return cls(**kwargs)


def load_text_align_config(name_or_path: str | Path) -> TextAlignConfig:
    """A packaged ``cmr train-text`` recipe by name (``minilm_cpu``) or a JSON file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TEXT_CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in TEXT_CONFIG_DIR.glob("*.json")))
        raise InputError(f"no text alignment config '{name_or_path}'; packaged ones: {have}")
    data = json.loads(path.read_text())
    data.setdefault("name", path.stem)
    return TextAlignConfig.from_dict(data)
