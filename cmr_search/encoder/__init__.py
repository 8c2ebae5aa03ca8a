"""The contrastive video-report encoder: models, loss, training and inference.

Public API (the search service, heads and tests rely on it)::

    load_video_encoder(path)   our checkpoint folder or the published cmr_c0.1 .ckpt
    load_text_encoder(path)    module with encode(list[str]) -> [N, 512]
    preprocess_clip(clip, cfg) uint8 [T, H, W] -> float [3, T, crop, crop]
    Embedder(path), encode_study(clips, embedder or checkpoint folder) -> (views, study, attention)
    load_config(name), list_configs()
"""

from cmr_search.encoder.checkpoint import (
    LoadReport,
    load_checkpoint,
    load_text_encoder,
    load_video_encoder,
)
from cmr_search.encoder.config import EncoderConfig, list_configs, load_config
from cmr_search.encoder.embed import Embedder, embed_store, embed_study, encode_study
from cmr_search.encoder.video import PreprocessConfig, preprocess_batch, preprocess_clip

__all__ = [
    "Embedder",
    "EncoderConfig",
    "LoadReport",
    "PreprocessConfig",
    "embed_store",
    "embed_study",
    "encode_study",
    "list_configs",
    "load_checkpoint",
    "load_config",
    "load_text_encoder",
    "load_video_encoder",
    "preprocess_batch",
    "preprocess_clip",
]
