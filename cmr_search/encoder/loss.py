"""Asymmetric bidirectional InfoNCE between views and reports, with flooding.

Every view of a study is paired with that study's report (DESIGN.md): this is what makes
the view embeddings view-invariant. A report's other views are positives too, so they are
masked out of each other's denominators rather than counted as negatives.

A study's counterfactual reports (`findings.rewrite`: a finding negated, asserted,
regraded or dropped) are extra negatives of its own views in the view -> report
direction, NegCLIP's hard negatives: the view must score its true report above each.
They are not negatives of other studies' views, for which a rewrite may well be true
("no LV thrombus" made from one report describes most other studies), and they have no
views of their own, so they take no part in the report -> view direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastiveLoss", "gather_with_grad", "pair_infonce"]


def pair_infonce(
    logits: torch.Tensor, study_of_view: torch.Tensor, lam: float,
    hard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per positive pair (view v, report of its study) losses in both directions.

    ``logits`` [V, S] = scale · v·u; ``study_of_view`` [V] gives each view's report column;
    ``hard`` [V, K] = scale · v·c, the view's own study's counterfactual reports (-inf
    where a study has fewer than K), extra negatives of l(v→u) only.
    Returns (loss, mean l(v→u), mean l(u→v)) with loss = mean(λ·l(v→u) + (1−λ)·l(u→v)).
    """
    v_idx = torch.arange(logits.shape[0], device=logits.device)
    # view -> reports: one positive column per row, every other report is a negative
    row = logits if hard is None else torch.cat([logits, hard], dim=1)
    l_vu = -F.log_softmax(row, dim=1)[v_idx, study_of_view]
    # report -> views: the denominator of pair (s, v) is v plus every view of *other* studies
    same = study_of_view.unsqueeze(0) == torch.arange(logits.shape[1], device=logits.device).unsqueeze(1)  # [S, V]
    lt = logits.t()  # [S, V]
    negatives = lt.masked_fill(same, float("-inf"))  # [S, V]
    neg_lse = torch.logsumexp(negatives, dim=1)  # [S]; -inf when a study's views are all the batch holds
    pos = lt[study_of_view, v_idx]  # [V]
    l_uv = torch.logaddexp(pos, neg_lse[study_of_view]) - pos
    loss = (lam * l_vu + (1.0 - lam) * l_uv).mean()
    return loss, l_vu.mean(), l_uv.mean()


def _masked(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~valid, float("-inf"))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (gradients flow back to each rank's own part);
    returns ``x`` unchanged outside torch.distributed, so CPU tests run the same code."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x), dim=0)


class ContrastiveLoss(nn.Module):
    """View–report InfoNCE plus the study-level term for the attention pooling, flooded.

    L = flood(pair + study_weight · study), flood(L) = |L − b| + b (Ishida et al., 2020):
    below the flood level b the gradient turns around instead of driving the loss to zero.
    """

    def __init__(self, lam: float = 0.75, flood: float = 0.05, study_weight: float = 1.0):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must lie in [0, 1]; got {lam}")
        self.lam, self.flood, self.study_weight = lam, flood, study_weight

    def forward(
        self,
        views: torch.Tensor,
        reports: torch.Tensor,
        study_of_view: torch.Tensor,
        logit_scale: torch.Tensor,
        studies: torch.Tensor | None = None,
        counterfactuals: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``views`` [V, D] and ``reports`` [S, D] L2-normalised, ``study_of_view`` [V] in
        [0, S); ``studies`` [S, D] the pooled study embeddings (row s pairs with report s);
        ``counterfactuals`` [S, K, D] each study's rewritten reports, ``valid`` [S, K] which
        of them exist. Returns named losses; ``loss`` is the one to back-propagate."""
        logits = logit_scale * views @ reports.t()
        hard_views = hard_studies = None
        if counterfactuals is not None:
            if valid is None:
                valid = torch.ones(counterfactuals.shape[:2], dtype=torch.bool, device=counterfactuals.device)
            own = counterfactuals[study_of_view]  # [V, K, D]
            hard_views = _masked(logit_scale * torch.einsum("vkd,vd->vk", own, views), valid[study_of_view])
            if studies is not None:
                hard_studies = _masked(logit_scale * torch.einsum("skd,sd->sk", counterfactuals, studies), valid)
        pair, v2t, t2v = pair_infonce(logits, study_of_view, self.lam, hard_views)
        out = {"pair": pair, "v2t": v2t, "t2v": t2v}
        if hard_views is not None:
            # how often a view prefers one of its study's rewrites to its true report
            out["hard_err"] = (hard_views.max(dim=1).values > logits.gather(1, study_of_view[:, None])[:, 0]).float().mean()
        total = pair
        if studies is not None and self.study_weight > 0:
            s_idx = torch.arange(studies.shape[0], device=studies.device)
            study, _, _ = pair_infonce(logit_scale * studies @ reports.t(), s_idx, self.lam, hard_studies)
            out["study"] = study
            total = total + self.study_weight * study
        out["raw"] = total
        out["loss"] = (total - self.flood).abs() + self.flood if self.flood > 0 else total
        return out
