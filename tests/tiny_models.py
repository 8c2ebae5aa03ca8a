"""The smallest encoder configuration that still is the real model family (tests only)."""

from __future__ import annotations

TINY_VISION = {
    "crop_size": 48, "embed_dim": 16, "depth": 3, "embed_dim_mul": [[1, 2.0]], "atten_head_mul": [[1, 2.0]],
    "pool_q_stride_size": [[1, 1, 2, 2]], "pool_kv_stride_adaptive": [1, 4, 4],
}


def tiny_encoder_config():
    """The CPU encoder configuration made smaller still, so a training step takes well under a second."""
    from dataclasses import replace

    from cmr_search.encoder.config import load_config

    cfg = load_config("mvit_xs_cpu")
    cfg.vision = replace(cfg.vision, **TINY_VISION)
    cfg.preprocess = replace(cfg.preprocess, crop=48, resize=48)
    cfg.__post_init__()
    cfg.train = replace(cfg.train, studies_per_batch=4, views_per_study=2, warmup_steps=2, max_steps=6,
                        checkpoint_every=2, eval_every=3, val_fraction=0.2, lr=1e-3)
    cfg.align = replace(cfg.align, max_steps=0)  # tests that align say so
    return cfg
