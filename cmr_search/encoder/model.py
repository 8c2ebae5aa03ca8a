"""The contrastive model: vision tower, text tower, study pooling and the temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmr_search.encoder.config import EncoderConfig
from cmr_search.encoder.pooling import GatedAttentionPool
from cmr_search.encoder.text import TextEncoder
from cmr_search.encoder.video import VideoEncoder

__all__ = ["CmrClip"]


class CmrClip(nn.Module):
    """Views and reports in one 512-d space; a study is the attention-pooled sum of its views."""

    def __init__(self, cfg: EncoderConfig, text: bool = True):
        super().__init__()
        self.cfg = cfg
        self.video = VideoEncoder(cfg.vision, cfg.dim)
        self.pool = GatedAttentionPool(cfg.dim, cfg.pooling.hidden, cfg.pooling.dropout)
        # log(1/τ); trained when learn_temperature, else a fixed buffer-like parameter
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / cfg.loss.temperature)), requires_grad=cfg.loss.learn_temperature
        )
        self.text = TextEncoder(cfg.text, cfg.dim) if text else None

    def scale(self) -> torch.Tensor:
        """1/τ, with τ kept at or above 0.01 (as CLIP does) so the logits cannot blow up."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def pool_study(self, views: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """View embeddings [B, N, D] + mask -> (L2-normalised study embeddings [B, D], attention [B, N])."""
        pooled, attention = self.pool(views, mask)
        return F.normalize(pooled, dim=-1), attention

    def forward(self, clips: torch.Tensor, reports: dict[str, torch.Tensor] | torch.Tensor, views_per_study: int,
                sentences: dict[str, torch.Tensor] | None = None):
        """A training batch: clips [S·v, 3, T, H, W] ordered by study, v per study, and the
        S tokenised reports (or, from a locked text tower, their embeddings [S, D]), and
        optionally more tokenised texts (the claims and their rewrites)
        -> (views [S·v, D], reports [S, D], studies [S, D], sentences [M, D] or None).
        Everything goes through this one forward, so DDP sees every parameter it uses."""
        views = self.video(clips)
        s = views.shape[0] // views_per_study
        mask = torch.ones(s, views_per_study, dtype=torch.bool, device=views.device)
        studies, _ = self.pool_study(views.view(s, views_per_study, -1), mask)
        reports = reports if isinstance(reports, torch.Tensor) else self.encode_text(reports)
        return views, reports, studies, None if sentences is None else self.encode_text(sentences)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised reports -> [N, D]."""
        if self.text is None:
            raise RuntimeError("this model was built without its text tower")
        return self.text(**tokens)
