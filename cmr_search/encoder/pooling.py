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
        # the gate runs on the real views only: with bags of 4-15 views a third of a padded
        # batch is padding, and these two products are most of the head's work
        study, slot = mask.nonzero(as_tuple=True)
        real = self.norm(views[study, slot])
        gate = torch.tanh(self.attention_v(real)) * torch.sigmoid(self.attention_u(real))
        logits = torch.full(mask.shape, float("-inf"), device=views.device)
        logits = logits.index_put((study, slot), self.attention_w(self.dropout(gate)).squeeze(-1).float())
        attention = F.softmax(logits, dim=1).to(real.dtype)
        weighted = attention[study, slot, None] * real
        pooled = weighted.new_zeros(mask.shape[0], real.shape[-1]).index_add(0, study, weighted)
        return pooled, attention
