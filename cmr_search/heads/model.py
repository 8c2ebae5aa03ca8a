"""The two heads: linear on the study embedding, gated-attention MIL on the view bag."""

from __future__ import annotations

import torch
from torch import nn

from cmr_search.encoder.pooling import GatedAttentionPool
from cmr_search.heads.config import HeadConfig

__all__ = ["LinearHead", "MILHead", "build_head"]


class LinearHead(nn.Module):
    """(LayerNorm) -> dropout -> Linear on the attention-pooled study embedding."""

    def __init__(self, dim: int, outputs: int, layernorm: bool, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, outputs)

    def forward(self, studies: torch.Tensor, views: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Study embeddings [B, D] -> (outputs [B, K], no attention)."""
        return self.out(self.dropout(self.norm(studies))), None


class MILHead(nn.Module):
    """Gated attention (Ilse et al.) over a study's views -> dropout -> Linear.

    Its own attention, trained for the label: which views matter for LVEF is not what
    mattered for the contrastive study embedding. Dropout acts on the pooled embedding
    only: inside the gate it drew a random number per view and hidden unit, half of a
    CPU training step, for no better validation loss (docs/BENCHMARKS.md, "Heads").
    """

    def __init__(self, dim: int, outputs: int, hidden: int, layernorm: bool, dropout: float):
        super().__init__()
        self.pool = GatedAttentionPool(dim, hidden, dropout=0.0, layernorm=layernorm)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, outputs)

    def forward(self, studies: torch.Tensor | None, views: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """View bags [B, V, D] + mask [B, V] -> (outputs [B, K], attention [B, V], 0 on padding)."""
        pooled, attention = self.pool(views, mask)
        return self.out(self.dropout(pooled)), attention


def build_head(cfg: HeadConfig, task: str, dim: int, outputs: int) -> nn.Module:
    """The head ``cfg`` names, for this task (LayerNorm on inputs for classification by default)."""
    layernorm = cfg.layernorm if cfg.layernorm is not None else task != "regression"
    if cfg.kind == "linear":
        return LinearHead(dim, outputs, layernorm, cfg.dropout)
    return MILHead(dim, outputs, cfg.hidden, layernorm, cfg.dropout)
