"""Text alignment on cached video embeddings: the phase that follows joint training.

LiT (Zhai et al., 2022) locks a pretrained image tower and trains only the text side
against it. Here the video tower has first trained jointly with the text tower
(``train.max_steps``); then it and the study pooling are locked, their embeddings of the
training studies are computed once, and the text tower's trainable part goes on alone for
``align.max_steps`` steps against those fixed targets, with the joint training's loss
(asymmetric InfoNCE on views and pooled studies, flooding, the counterfactual claims).

Why: on a CPU a joint step is almost all video tower, so in a fixed budget the text tower
sees few reports, and what it must learn (that "no thrombus" and "thrombus", "mild" and
"severe" are different claims about a study) needs many of them. A step of this phase
costs the text tower's forward and backward only, so it can afford larger batches (more
negatives) and more steps; the video embeddings it aligns to are the ones search uses.
"""

from __future__ import annotations

import torch

from cmr_search.encoder.config import EncoderConfig
from cmr_search.encoder.data import ClipCorpus, ContrastiveBatches, Study, eval_clips
from cmr_search.encoder.loss import ContrastiveLoss
from cmr_search.encoder.model import CmrClip

__all__ = ["TextAligner", "embed_studies"]


@torch.inference_mode()
def embed_studies(model: CmrClip, corpus: ClipCorpus, studies: list[Study], device: torch.device,
                  batch: int = 32) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per study: view embeddings [n_i, D]; and the pooled study embeddings [N, D] (no augmentation)."""
    views = []
    for st in studies:
        x = eval_clips(corpus, st, model.cfg.preprocess)
        views.append(torch.cat([model.video(x[i : i + batch].to(device)).float() for i in range(0, len(x), batch)]))
    n = max(v.shape[0] for v in views)
    padded = torch.zeros(len(views), n, model.cfg.dim, device=device)
    mask = torch.zeros(len(views), n, dtype=torch.bool, device=device)
    for i, v in enumerate(views):
        padded[i, : len(v)], mask[i, : len(v)] = v, True
    studies_emb, _ = model.pool_study(padded, mask)
    return [v.cpu() for v in views], studies_emb.float().cpu()


class TextAligner:
    """The locked video tower's embeddings of the training studies, ``views`` (per study,
    [n_i, D] in the order of its ``row_ids``) and ``pooled`` [N, D], and the text-only
    training step against them."""

    def __init__(self, model: CmrClip, corpus: ClipCorpus, studies: list[Study], views: list[torch.Tensor],
                 pooled: torch.Tensor, cfg: EncoderConfig, device: torch.device, ranks: int = 1):
        self.model = model
        self.views = torch.cat(views).to(device)
        self.pooled = pooled.to(device)
        self.row_of = {row: i for i, row in enumerate(r for st in studies for r in st.row_ids)}
        a, t = cfg.align, cfg.train
        # items are global step numbers, so the phase's batches are a function of (seed, step)
        # like the joint phase's: a resumed run draws what the killed one would have
        self.batches = ContrastiveBatches(corpus, studies, a.studies_per_batch, t.views_per_study, cfg.text.sentences,
                                          cfg.augment, cfg.preprocess, t.seed,
                                          length=(t.max_steps + a.max_steps) * ranks, ranks=ranks,
                                          counterfactuals=cfg.text.counterfactuals, clips=False,
                                          claim_targets=cfg.loss.match_weight > 0)
        self.ranks = ranks

    def step(self, batch: dict, loss_fn: ContrastiveLoss, amp) -> dict[str, torch.Tensor]:
        """Forward and backward of one batch (``ContrastiveBatches`` without clips): its
        reports against the cached embeddings of its studies' views and of the studies;
        the text tower's gradients are averaged over ranks here (it runs outside DDP)."""
        device = self.views.device
        text = self.model.text
        views = self.views[torch.tensor([self.row_of[r] for r in batch["rows"].tolist()], device=device)]
        studies = self.pooled[batch["studies"].to(device)]
        tokens = {k: v.to(device) for k, v in text.tokenize(batch["texts"]).items()}
        hard = {}
        with amp:
            reports = self.model.encode_text(tokens).float()
            if "claims" in batch:
                n, k = batch["counterfactual_valid"].shape
                short = {k_: v.to(device) for k_, v in text.tokenize(batch["claims"] + batch["counterfactuals"]).items()}
                sentences = self.model.encode_text(short).float()
                hard = {"claims": sentences[:n], "rewrites": sentences[n:].view(n, k, -1),
                        "valid": batch["counterfactual_valid"].to(device)}
                if "claim_targets" in batch:
                    hard["match"] = (sentences, studies, batch["claim_targets"].to(device))
            # the temperature stays where the joint phase left it: the targets are fixed
            out = loss_fn(views, reports, batch["study_of_view"].to(device), self.model.scale().detach(), studies,
                          **hard)
        out["loss"].backward()
        if self.ranks > 1:
            for p in text.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.ranks
        return out
