"""Encoder fixtures: a private copy of the ingested test store and a tiny model config."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from encoder.config import load_config


@pytest.fixture()
def enc_store(ingested, tmp_path):
    """A private copy of the session's ingested store (encoder tests write into it)."""
    store, _ = ingested
    dst = tmp_path / "store"
    shutil.copytree(store.root, dst)
    return dst


@pytest.fixture()
def tiny_cfg():
    """The CPU configuration made smaller still, so a training step takes well under a second."""
    cfg = load_config("mvit_xs_cpu")
    cfg.vision = replace(cfg.vision, **TINY_VISION)
    cfg.preprocess = replace(cfg.preprocess, crop=48, resize=48)
    cfg.__post_init__()
    cfg.train = replace(cfg.train, studies_per_batch=4, views_per_study=2, warmup_steps=2, max_steps=6,
                        checkpoint_every=2, eval_every=3, val_fraction=0.2, lr=1e-3)
    return cfg


TINY_VISION = {
    "crop_size": 48, "embed_dim": 16, "depth": 3, "embed_dim_mul": [[1, 2.0]], "atten_head_mul": [[1, 2.0]],
    "pool_q_stride_size": [[1, 1, 2, 2]], "pool_kv_stride_adaptive": [1, 4, 4],
}


@pytest.fixture()
def tiny_cfg_file(tiny_cfg, tmp_path):
    """The tiny config as a named JSON file (what the CLI takes)."""
    import json

    path = tmp_path / "tiny.json"
    data = tiny_cfg.to_dict()
    data.pop("name")
    path.write_text(json.dumps(data))
    return path
