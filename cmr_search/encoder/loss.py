"""Asymmetric bidirectional InfoNCE between views and reports, with flooding.

Every view of a study is paired with that study's report (DESIGN.md): this is what makes
the view embeddings view-invariant. A report's other views are positives too, so they are
masked out of each other's denominators rather than counted as negatives.

Hard negatives (NegCLIP's idea): each study brings one claim, a finding-bearing sentence
of its sampled report, and K counterfactual rewrites of it (`findings.rewrite`: the
finding negated, asserted, regraded or dropped). Its views, and its pooled embedding, must
score the claim above each of its rewrites: a softmax over [claim, rewrites] alone. Other
studies' claims are no negatives here, since a claim ("No LV thrombus.") is true of most
studies. Claims are single sentences, so the text tower reads a few dozen tokens per
study for them, not another report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastiveLoss", "claim_loss", "gather_with_grad", "match_loss", "pair_infonce"]


def pair_infonce(
    logits: torch.Tensor, study_of_view: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per positive pair (view v, report of its study) losses in both directions.

    ``logits`` [V, S] = scale · v·u; ``study_of_view`` [V] gives each view's report column.
    Returns (loss, mean l(v→u), mean l(u→v)) with loss = mean(λ·l(v→u) + (1−λ)·l(u→v)).
    """
    v_idx = torch.arange(logits.shape[0], device=logits.device)
    # view -> reports: one positive column per row, every other report is a negative
    l_vu = -F.log_softmax(logits, dim=1)[v_idx, study_of_view]
    # report -> views: the denominator of pair (s, v) is v plus every view of *other* studies
    same = study_of_view.unsqueeze(0) == torch.arange(logits.shape[1], device=logits.device).unsqueeze(1)  # [S, V]
    lt = logits.t()  # [S, V]
    negatives = lt.masked_fill(same, float("-inf"))  # [S, V]
    neg_lse = torch.logsumexp(negatives, dim=1)  # [S]; -inf when a study's views are all the batch holds
    pos = lt[study_of_view, v_idx]  # [V]
    l_uv = torch.logaddexp(pos, neg_lse[study_of_view]) - pos
    loss = (lam * l_vu + (1.0 - lam) * l_uv).mean()
    return loss, l_vu.mean(), l_uv.mean()


def claim_loss(
    x: torch.Tensor, claims: torch.Tensor, rewrites: torch.Tensor, valid: torch.Tensor,
    owner: torch.Tensor, logit_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` [N, D] (a view or a pooled study) against its study's claim and its
    rewrites: ``claims`` [S, D], ``rewrites`` [S, K, D], ``valid`` [S, K] (which rewrites
    exist), ``owner`` [N] the row's study. Returns (mean −log softmax([claim, rewrites])[0]
    over rows whose study has a rewrite, the share of those rows that score a rewrite at
    or above the claim); zeros when no study has one."""
    has = valid[owner].any(dim=1)
    if not bool(has.any()):
        zero = x.sum() * 0.0
        return zero, zero.detach()
    x, own = x[has], owner[has]
    pos = logit_scale * (x * claims[own]).sum(-1, keepdim=True)  # [n, 1]
    neg = logit_scale * torch.einsum("nkd,nd->nk", rewrites[own], x)
    neg = neg.masked_fill(~valid[own], float("-inf"))
    loss = -F.log_softmax(torch.cat([pos, neg], dim=1), dim=1)[:, 0].mean()
    return loss, (neg.max(dim=1).values >= pos[:, 0]).float().mean().detach()


def _multi_positive(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Mean over rows that have a positive and a negative of: the mean over the row's
    positives p of −log(exp(l_p) / Σ exp(l) over the row's known columns) (SupCon's form)."""
    known, pos = targets >= 0, targets == 1
    rows = pos.any(dim=1) & (known & ~pos).any(dim=1)
    if not bool(rows.any()):
        return None
    logits, known, pos = logits[rows], known[rows], pos[rows]
    denom = torch.logsumexp(logits.masked_fill(~known, float("-inf")), dim=1, keepdim=True)
    per_row = ((denom - logits) * pos).sum(dim=1) / pos.sum(dim=1)
    return per_row.mean()


def match_loss(texts: torch.Tensor, studies: torch.Tensor, targets: torch.Tensor,
               logit_scale: torch.Tensor) -> torch.Tensor:
    """Claims and rewrites ``texts`` [M, D] against ``studies`` [S, D] with ``targets``
    [M, S] (1 the study's report bears the text out, 0 it says otherwise, -1 unknown):
    the mean of text→studies and studies→text multi-positive InfoNCE (``_multi_positive``);
    zero when no row has both a positive and a negative."""
    logits = logit_scale * texts @ studies.t()
    sides = [x for x in (_multi_positive(logits, targets), _multi_positive(logits.t(), targets.t())) if x is not None]
    return torch.stack(sides).mean() if sides else logits.sum() * 0.0


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

    def __init__(self, lam: float = 0.75, flood: float = 0.05, study_weight: float = 1.0,
                 hard_weight: float = 1.0, match_weight: float = 0.0):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must lie in [0, 1]; got {lam}")
        self.lam, self.flood, self.study_weight, self.hard_weight = lam, flood, study_weight, hard_weight
        self.match_weight = match_weight

    def forward(
        self,
        views: torch.Tensor,
        reports: torch.Tensor,
        study_of_view: torch.Tensor,
        logit_scale: torch.Tensor,
        studies: torch.Tensor | None = None,
        claims: torch.Tensor | None = None,
        rewrites: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        match: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``views`` [V, D] and ``reports`` [S, D] L2-normalised, ``study_of_view`` [V] in
        [0, S); ``studies`` [S, D] the pooled study embeddings (row s pairs with report s);
        ``claims`` [S, D], ``rewrites`` [S, K, D] and ``valid`` [S, K] each study's claim and
        its counterfactuals (``claim_loss``); ``match`` (texts, studies, targets) the claim
        matching of ``match_loss`` (this rank's own rows: its targets are local). Returns
        named losses; ``loss`` is the one to back-propagate."""
        logits = logit_scale * views @ reports.t()
        pair, v2t, t2v = pair_infonce(logits, study_of_view, self.lam)
        out = {"pair": pair, "v2t": v2t, "t2v": t2v}
        total = pair
        if studies is not None and self.study_weight > 0:
            s_idx = torch.arange(studies.shape[0], device=studies.device)
            study, _, _ = pair_infonce(logit_scale * studies @ reports.t(), s_idx, self.lam)
            out["study"] = study
            total = total + self.study_weight * study
        if claims is not None and self.hard_weight > 0:
            hard, err = claim_loss(views, claims, rewrites, valid, study_of_view, logit_scale)
            if studies is not None and self.study_weight > 0:
                s_idx = torch.arange(studies.shape[0], device=studies.device)
                hard_s, _ = claim_loss(studies, claims, rewrites, valid, s_idx, logit_scale)
                hard = hard + self.study_weight * hard_s
            out["hard"], out["hard_err"] = hard, err
            total = total + self.hard_weight * hard
        if match is not None and self.match_weight > 0:
            out["match"] = match_loss(*match, logit_scale)
            total = total + self.match_weight * out["match"]
        out["raw"] = total
        out["loss"] = (total - self.flood).abs() + self.flood if self.flood > 0 else total
        return out
