"""``cmr train-text``: a text tower aligned to a locked video model's stored embeddings.

LiT (Zhai et al., 2022) locks a pretrained image tower and trains the text side against it.
Here the roles are those of a store: the video model (trained here, imported, or the
published ``cmr_c0.1`` vision tower, which has no text tower at all) has already embedded
every view and study, so aligning a text tower to it needs no video forward pass, only the
reports. The text tower's lower layers are locked too, so each text's hidden states below
the trainable layers are computed once (``TrunkCache``) and a step costs the top layers,
the projection and the loss: the joint recipe's loss family (asymmetric InfoNCE on views and
studies, flooding, counterfactual claims, claim matching) on the same report sampling.

The result is a model of its own (``TEXT_FORMAT``): its text weights and temperature, and a
pointer (``StoreLayout.vectors_of``) to the video model whose stored vectors it searches;
they are never copied. Checkpoints, exact resume and the validation retrieval work as in
``cmr train-encoder``: a batch is a function of (seed, step), dropout is seeded by the step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from cmr_search.core.exceptions import InputError, StoreError
from cmr_search.core.layout import StoreLayout, publish_folder
from cmr_search.encoder.checkpoint import (
    FORMAT,
    TEXT_FORMAT,
    checkpoint_meta,
    checkpoint_model_id,
    save_checkpoint,
)
from cmr_search.encoder.config import AugmentConfig, TextAlignConfig
from cmr_search.encoder.data import ClipCorpus, ContrastiveBatches, Study, patient_split
from cmr_search.encoder.loss import ContrastiveLoss
from cmr_search.encoder.registry import EncoderRegistry
from cmr_search.encoder.runlog import (
    metric_row,
    progress_text,
    step_optimizer,
    trim_metric_rows,
    write_metric_rows,
)
from cmr_search.encoder.text import TextEncoder
from cmr_search.encoder.train import TrainResult, lr_at
from cmr_search.metrics.retrieval import retrieval_summary

__all__ = ["AlignedText", "TextTrainer", "TrunkCache"]


class AlignedText(nn.Module):
    """The trained part of a text-aligned model: the text tower and the temperature, named
    as in ``CmrClip`` (``text.*``, ``logit_scale``), so the search loads it as any text tower."""

    def __init__(self, cfg: TextAlignConfig, dim: int, temperature: float):
        super().__init__()
        self.text = TextEncoder(cfg.text, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=cfg.loss.learn_temperature)

    def scale(self) -> torch.Tensor:
        """1/τ, τ kept at or above 0.01 as in ``CmrClip``."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


class TrunkCache:
    """The locked layers' hidden states of every text a run draws, computed once: a study's
    report variants together (one batch of fixed composition), any other text (claims and
    their rewrites) alone. A text is batched the same way in every run, so a resumed run
    sees the very states the killed one did. Past ``max_bytes`` (a large archive: about
    300 kB per study) new states are computed at each use instead of kept, which changes
    the time of a step, not its result."""

    def __init__(self, text: TextEncoder, variants: list[list[str]], max_bytes: float = 4e9):
        self.text, self.variants, self.max_bytes = text, variants, max_bytes
        self.k = len(variants[0]) if variants else 0
        self.reports: dict[int, list[torch.Tensor]] = {}
        self.sentences: dict[str, torch.Tensor] = {}
        self.bytes = 0

    def _keep(self, states: list[torch.Tensor]) -> bool:
        size = sum(s.numel() * s.element_size() for s in states)
        if self.bytes + size > self.max_bytes:
            return False
        self.bytes += size
        return True

    def report(self, report_id: int) -> torch.Tensor:
        """States of report variant ``report_id`` (study ``id // k``, variant ``id % k``)."""
        study, variant = divmod(int(report_id), self.k)
        states = self.reports.get(study)
        if states is None:
            states = self.text.trunk(self.variants[study])
            if self._keep(states):
                self.reports[study] = states
        return states[variant]

    def sentence(self, text: str) -> torch.Tensor:
        """States of one short text."""
        state = self.sentences.get(text)
        if state is None:
            state = self.text.trunk([text])[0]
            if self._keep([state]):
                self.sentences[text] = state
        return state


@dataclass
class Targets:
    """The locked model's stored vectors the text aligns to: ``views`` [clips, D] (row
    ``row_of[clip row id]``) and ``studies`` [N, D] in the order of ``studies_list``."""

    studies_list: list[Study]
    views: torch.Tensor
    studies: torch.Tensor
    row_of: dict[int, int]

    def to(self, device: torch.device) -> Targets:
        """The same targets on ``device``."""
        return Targets(self.studies_list, self.views.to(device), self.studies.to(device), self.row_of)


def _targets(store_root: Path, video_model: str, studies: list[Study], log) -> Targets:
    """The stored embeddings of ``studies`` by ``video_model``; studies it has not embedded
    are left out (and said), clips without a view embedding are left out of their study."""
    from cmr_search.store.embedding_store import EmbeddingStore

    tables = EmbeddingStore.open(store_root)
    study_rows = tables.study_rows(video_model, ["study_uid", "vector"])
    if not study_rows.num_rows:
        raise StoreError(f"{store_root} has no study embeddings of model {video_model}; run "
                         f"`cmr embed --store {store_root} --checkpoint <its checkpoint>` first")
    study_vec = dict(zip(study_rows["study_uid"].to_pylist(), tables.vectors(study_rows)))
    view_rows = tables.view_rows(video_model, ["clip_id", "vector"])
    view_vec = dict(zip(view_rows["clip_id"].to_pylist(), tables.vectors(view_rows)))
    kept, views, pooled, row_of = [], [], [], {}
    for st in studies:
        have = [i for i, c in enumerate(st.clip_ids) if c in view_vec]
        if st.study_uid not in study_vec or not have:
            continue
        kept.append(Study(st.study_uid, st.patient_key, st.report, [st.row_ids[i] for i in have],
                          [st.clip_ids[i] for i in have], [st.views[i] for i in have],
                          [st.slice_index[i] for i in have]))
        for i in have:
            row_of[st.row_ids[i]] = len(views)
            views.append(view_vec[st.clip_ids[i]])
        pooled.append(study_vec[st.study_uid])
    if len(kept) < len(studies) and log:
        log(f"{len(studies) - len(kept)} of {len(studies)} studies with a report have no embedding of model "
            f"{video_model} and are left out; `cmr embed` embeds them")
    if not kept:
        raise StoreError(f"no study with a report has an embedding of model {video_model}; run `cmr embed` first")
    return Targets(kept, torch.from_numpy(np.stack(views)).float(), torch.from_numpy(np.stack(pooled)).float(), row_of)


def _initial_temperature(folder: Path, cfg: TextAlignConfig) -> float:
    """The video model's learned temperature where it has one (a jointly trained model),
    else the recipe's: the targets are that model's, and so is the scale of their similarities."""
    if checkpoint_meta(folder).get("format") == FORMAT:
        scale = load_file(folder / "model.safetensors").get("logit_scale")
        if scale is not None:
            return float(1.0 / scale.clamp(max=math.log(100.0)).exp())
    return cfg.loss.temperature


class TextTrainer:
    """One ``cmr train-text`` run: a text tower against the stored embeddings of one model."""

    def __init__(self, store_root: Path, cfg: TextAlignConfig, model_id: str | None = None,
                 run_dir: Path | None = None, resume: bool = False, progress: bool = True, log=print,
                 device: str | None = None):
        self.store_root, self.cfg, self.log, self.progress = Path(store_root), cfg, log, progress
        layout = StoreLayout(self.store_root)
        registry = EncoderRegistry(self.store_root)
        model_id = model_id or registry.default or layout.latest_model_id()
        if model_id is None:
            raise InputError(f"{store_root} has no encoder to align a text tower to; embed it first "
                             f"(`cmr embed --store {store_root} --checkpoint PATH`)")
        registry.card(model_id)  # an unregistered model says how to register it
        # a text-aligned model's own video model: a new text tower never stacks on another
        self.video_model = layout.vectors_model_id(model_id)
        video_cfg = registry.config(self.video_model)
        self.dim, self.video_cfg = video_cfg.dim, video_cfg
        self.run_dir = Path(run_dir or layout.run(f"text-{self.video_model}-seed{cfg.seed}"))
        self.ckpt_dir = self.run_dir / "checkpoint"
        if self.ckpt_dir.exists() and not resume:
            raise InputError(f"{self.run_dir} already holds a run; pass --resume to continue it or --run-name "
                             "for a new one")
        # float32 on any device: the text tower is small, and a step is the same sum on every run
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.seed)
        self.model = AlignedText(cfg, self.dim, _initial_temperature(layout.encoder(self.video_model), cfg))
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(self._param_groups(), betas=(0.9, 0.98), eps=1e-6)
        lc = cfg.loss
        self.loss_fn = ContrastiveLoss(lc.lam, lc.flood, lc.study_weight, lc.hard_weight, lc.match_weight)
        self.step, self.elapsed, self.val = 0, 0.0, {}
        if resume and self.ckpt_dir.exists():
            self._restore()
        corpus = ClipCorpus(self.store_root)
        train, val = patient_split(corpus.with_reports(), cfg.val_fraction,
                                   cfg.seed if cfg.split_seed is None else cfg.split_seed)
        self.train = _targets(self.store_root, self.video_model, train, log).to(self.device)
        self.held_out = _targets(self.store_root, self.video_model, val, None).to(self.device) if val else None
        self.batches = ContrastiveBatches(
            corpus, self.train.studies_list, cfg.studies_per_batch, cfg.views_per_study, cfg.text.sentences,
            AugmentConfig(), video_cfg.preprocess, cfg.seed, length=cfg.max_steps,
            stratify_views=cfg.stratify_views, report_variants=max(1, cfg.text.cached_variants),
            counterfactuals=cfg.text.counterfactuals, clips=False, claim_targets=cfg.loss.match_weight > 0)
        self.cache = TrunkCache(self.model.text, self.batches.variant_texts(), cfg.trunk_cache_gb * 1e9)

    def _param_groups(self) -> list[dict]:
        """The trainable BERT layers at ``lr``, the projection and temperature at ``proj_lr``;
        no weight decay on norms, biases and the temperature."""
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                fresh = name.startswith("text.text_proj") or name == "logit_scale"
                groups.setdefault((fresh, p.ndim >= 2 and name != "logit_scale"), []).append(p)
        return [{"params": ps, "base_lr": self.cfg.proj_lr if fresh else self.cfg.lr,
                 "weight_decay": self.cfg.weight_decay if decay else 0.0} for (fresh, decay), ps in groups.items()]

    # -- one step ---------------------------------------------------------------------------
    def step_once(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward and backward of one batch: its reports and claims through the trainable
        layers from their cached states, against the stored vectors of its views and studies."""
        text, device = self.model.text, self.device
        views = self.train.views[torch.tensor([self.train.row_of[r] for r in batch["rows"].tolist()], device=device)]
        studies = self.train.studies[batch["studies"].to(device)]
        reports = text.top([self.cache.report(i) for i in batch["report_ids"].tolist()])
        hard = {}
        if "claims" in batch:
            n, k = batch["counterfactual_valid"].shape
            sentences = text.top([self.cache.sentence(t) for t in batch["claims"] + batch["counterfactuals"]])
            hard = {"claims": sentences[:n], "rewrites": sentences[n:].view(n, k, -1),
                    "valid": batch["counterfactual_valid"].to(device)}
            if "claim_targets" in batch:
                hard["match"] = (sentences, studies, batch["claim_targets"].to(device))
        out = self.loss_fn(views, reports, batch["study_of_view"].to(device), self.model.scale(), studies, **hard)
        out["loss"].backward()
        return out

    def validate(self) -> dict:
        """Text-to-study retrieval of the held-out patients: each whole report against their
        stored study vectors."""
        if self.held_out is None:
            return {}
        reports = self.model.text.encode([s.report for s in self.held_out.studies_list]).float()
        sim = (reports @ self.held_out.studies.cpu().t()).numpy()
        return retrieval_summary(sim, np.arange(len(sim)))

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None, max_minutes: float | None = None) -> TrainResult:
        """Train to ``max_steps`` (default: the recipe's) or for ``max_minutes`` of this call,
        then publish the model; its ``TrainResult``."""
        cfg = self.cfg
        end_step = min(max_steps or cfg.max_steps, cfg.max_steps)
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else math.inf
        metrics_path = self.run_dir / "metrics.csv"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = self._bar(end_step)
        self.model.train()
        window, started = [], time.monotonic()
        while self.step < end_step and time.monotonic() < deadline:
            batch = self.batches[self.step]  # a function of (seed, step): what a resumed run draws too
            torch.manual_seed(cfg.seed * 1_000_003 + self.step)  # the top layers' dropout
            scale = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            out = self.step_once(batch)
            step_optimizer(self.model, self.optimizer, cfg.grad_clip)
            self.step += 1
            self.elapsed += time.monotonic() - started
            started = time.monotonic()
            row = metric_row(out, self.step, self.optimizer, self.model.scale(), self.elapsed)
            if self.step % cfg.eval_every == 0 or self.step == end_step:
                self.val = self.validate()
                row |= {f"val_{k}": v for k, v in self.val.items()}
                started = time.monotonic()  # validation time is not training time
            window.append(row)
            if self.step % 10 == 0:
                write_metric_rows(metrics_path, window)
                window = []
            if self.step % cfg.checkpoint_every == 0:
                self._checkpoint()
            if bar:
                bar[0].update(bar[1], completed=self.step, description=progress_text(row["loss"], self.val))
        write_metric_rows(metrics_path, window)
        if bar:
            bar[0].stop()
        self._checkpoint()
        return self._export()

    def _bar(self, end_step: int):
        if not self.progress:
            return None
        from cmr_search.core.progress import progress_bar

        bar = progress_bar()
        bar.start()
        return bar, bar.add_task("aligning text", total=end_step, completed=self.step)

    # -- checkpoints and the model ------------------------------------------------------------
    def _meta(self) -> dict:
        """config.json of this run's model: the video model's config with this text tower, the
        recipe, and the video model it points at."""
        config = self.video_cfg.to_dict() | {"text": self.cfg.to_dict()["text"]}
        return {"format": TEXT_FORMAT, "video_model": self.video_model, "step": self.step, "config": config,
                "text_training": self.cfg.to_dict()}

    def _checkpoint(self) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed, "val": self.val}
        save_checkpoint(self.model, self.cfg, self.ckpt_dir, self.step, train_state=state, meta=self._meta())
        trim_metric_rows(self.run_dir / "metrics.csv", self.step)

    def _restore(self) -> None:
        meta = json.loads((self.ckpt_dir / "config.json").read_text())
        recipe = TextAlignConfig.from_dict(meta["text_training"]).to_dict()
        if json.loads(json.dumps(recipe)) != json.loads(json.dumps(self.cfg.to_dict())):
            raise InputError(f"{self.run_dir} was trained with another recipe; resume it with the same --config "
                             "and --text-model")
        self.model.load_state_dict(load_file(self.ckpt_dir / "model.safetensors", device=str(self.device)))
        state = torch.load(self.ckpt_dir / "train_state.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed, self.val = int(state["step"]), float(state["elapsed"]), state.get("val", {})
        trim_metric_rows(self.run_dir / "metrics.csv", self.step)
        self.log(f"resumed {self.run_dir.name} at step {self.step}")

    def _export(self) -> TrainResult:
        """Publish the model as ``STORE/encoders/<model_id>`` (weights, config, the pointer to
        its video model) and register it; it becomes the store's default where the default
        was its video model or none (the same vectors, and now a text tower)."""
        layout = StoreLayout(self.store_root)
        tmp = layout.encoders / f".export-text-{self.step}-{time.monotonic_ns()}"
        save_checkpoint(self.model, self.cfg, tmp, self.step, meta=self._meta())
        (tmp / layout.vectors_of(self.video_model).name).write_text(self.video_model + "\n")
        model_id = checkpoint_model_id(tmp)
        final = publish_folder(tmp, layout.encoder(model_id))
        registry = EncoderRegistry(self.store_root)
        registry.note(model_id, "aligned", source=f"run {self.run_dir.name}", video_model=self.video_model)
        if registry.default in (None, self.video_model):
            registry.set_default(model_id)
        self.log(f"text model {model_id} on video model {self.video_model} after {self.step} steps "
                 f"({self.elapsed / 60:.1f} min): {final}")
        return TrainResult(final, model_id, self.step, self.elapsed, self.val)
