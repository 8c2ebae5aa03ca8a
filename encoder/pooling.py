"""Gated-attention pooling (Ilse et al., 2018) of a study's view embeddings, batched with a mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedAttentionPool"]


class GatedAttentionPool(nn.Module):
    """a_k = softmax_k(wᵀ(tanh(V h_k) ⊙ sigm(U h_k))), pooled = Σ a_k h_k.

    Bags of different sizes share one batch: ``mask`` marks the real views, and the
    attention on padding is exactly zero (its logits are -inf before the softmax).
    """

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.0, layernorm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.attention_v = nn.Linear(dim, hidden)
        self.attention_u = nn.Linear(dim, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, views: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``views`` [B, N, D], ``mask`` [B, N] bool -> (pooled [B, D], attention [B, N])."""
        if views.dim() != 3 or mask.shape != views.shape[:2]:
            raise ValueError(f"expected views [B, N, D] and mask [B, N]; got {tuple(views.shape)} and {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every study in the batch needs at least one view (a row of the mask is all False)")
        h = self.norm(views)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        logits = self.attention_w(self.dropout(gate)).squeeze(-1)
        logits = logits.float().masked_fill(~mask, float("-inf"))
        attention = F.softmax(logits, dim=1).to(h.dtype)
        pooled = torch.einsum("bn,bnd->bd", attention, h)
        return pooled, attention
