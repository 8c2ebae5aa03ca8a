"""The comparison model of the evaluation: the trained encoder's own architecture at random
initialisation (the paper compares against a network that never saw a report), embedded
into the store beside the trained model under its own ``model_id``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout

__all__ = ["embed_random_baseline", "random_baseline"]


def random_baseline(store_root: Path, model_id: str, seed: int = 0) -> Path:
    """``STORE/encoders/<baseline_id>``: the architecture of encoder ``model_id`` with weights
    drawn from ``seed``. Deterministic, so a second call finds the same folder; LATEST is
    left alone (the baseline is never the store's default model)."""
    from cmr_search.encoder.checkpoint import export_encoder
    from cmr_search.encoder.config import EncoderConfig
    from cmr_search.encoder.model import CmrClip
    from cmr_search.store.models import pull_model

    layout = StoreLayout(store_root)
    pull_model(layout, model_id)  # on object storage, a model another machine registered
    meta = layout.encoder(model_id) / "config.json"
    if not meta.exists():
        raise InputError(f"no encoder {model_id} in {layout.encoders}; the random baseline copies a trained encoder's "
                         "architecture (train one with `cmr train-encoder`)")
    cfg = EncoderConfig.from_dict(json.loads(meta.read_text())["config"])
    from cmr_search.encoder.registry import EncoderRegistry

    torch.manual_seed(seed)
    model = CmrClip(cfg).eval()
    baseline_id, folder = export_encoder(model, cfg, store_root, step=0, latest=False)
    EncoderRegistry(store_root).note(baseline_id, "baseline", source=f"random init, seed {seed}", baseline_of=model_id)
    return folder


def embed_random_baseline(store_root: Path, model_id: str, seed: int = 0, index_config=None,
                          progress: bool = True) -> str:
    """Make sure every clip and study of the store has an embedding by the random baseline
    of ``model_id`` (only what is missing is embedded); its ``model_id``."""
    from cmr_search.encoder.embed import embed_store

    folder = random_baseline(store_root, model_id, seed)
    return embed_store(store_root, folder, progress=progress, index_config=index_config, set_default=False).model_id
