"""Vision tower: MViT -> Linear(768, 512) -> L2 normalise, and the clip preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmr_search.encoder.mvit import MViT, MViTConfig

__all__ = ["PreprocessConfig", "VideoEncoder", "preprocess_batch", "preprocess_clip"]


@dataclass
class PreprocessConfig:
    """uint8 clip [T, H, W] -> float [3, T, crop, crop], as the model was trained.

    value = (pixel - pixel_mean) / pixel_std after resizing the short side to ``resize``
    and cropping the centre ``crop`` x ``crop``. The published checkpoint was trained
    with pytorchvideo's Normalize(0.45, 0.225) applied to 0..255 values followed by
    Div255, i.e. pixel_mean 0.45 and pixel_std 57.375 (0.225 x 255) in uint8 units, and
    resize 264 / crop 224 (its ShortSideScale(crop + 40) + CenterCrop).
    """

    crop: int = 224  # model input height and width
    resize: int = 224  # short side before the centre crop
    pixel_mean: float = 114.75  # 0.45 x 255 (Kinetics mean)
    pixel_std: float = 57.375  # 0.225 x 255


def preprocess_batch(clips: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 or float clips [B, T, H, W] (0..255) -> float32 [B, 3, T, crop, crop].
    ``cfg``: the preprocessing, or a whole ``EncoderConfig`` (its ``preprocess``)."""
    cfg = getattr(cfg, "preprocess", cfg)
    if clips.dim() != 4:
        raise ValueError(f"expected clips [B, T, H, W]; got shape {tuple(clips.shape)}")
    x = clips.float()
    b, t, h, w = x.shape
    if min(h, w) != cfg.resize:
        scale = cfg.resize / min(h, w)
        size = (max(cfg.resize, round(h * scale)), max(cfg.resize, round(w * scale)))
        x = F.interpolate(x.reshape(b * t, 1, h, w), size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.reshape(b, t, *size)
    h, w = x.shape[-2:]
    top, left = (h - cfg.crop) // 2, (w - cfg.crop) // 2
    x = x[..., top : top + cfg.crop, left : left + cfg.crop]
    x = (x - cfg.pixel_mean) / cfg.pixel_std
    return x.unsqueeze(1).expand(b, 3, t, cfg.crop, cfg.crop).contiguous()


def preprocess_clip(clip: np.ndarray | torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """One uint8 clip [T, H, W] -> float32 [3, T, crop, crop] (grey copied to 3 channels);
    ``cfg`` as for ``preprocess_batch``."""
    x = torch.as_tensor(np.asarray(clip)) if not isinstance(clip, torch.Tensor) else clip
    if x.dim() != 3:
        raise ValueError(f"expected one clip [T, H, W]; got shape {tuple(x.shape)}")
    return preprocess_batch(x.unsqueeze(0), cfg)[0]


class VideoEncoder(nn.Module):
    """``video_encoder`` (MViT, class token after norm_embed) and ``video_proj`` — the
    names of the published checkpoint's ``model.video_encoder.*`` / ``model.video_proj.*``."""

    def __init__(self, mvit: MViTConfig, dim: int = 512):
        super().__init__()
        self.video_encoder = MViT(mvit)
        self.video_proj = nn.Linear(self.video_encoder.norm_embed.normalized_shape[0], dim)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Preprocessed clips [B, 3, T, H, W] -> L2-normalised [B, dim]."""
        return F.normalize(self.video_proj(self.video_encoder(clips)), dim=-1)
