"""``cmr train-encoder``: contrastive pre-training on a store's clips and reports.

The loop reads top to bottom: set the learning rate, micro-steps (forward, loss, backward),
clip, step, log; evaluate and checkpoint every N steps. A checkpoint holds the model, the
optimizer, the step and the config, and batches are a function of (seed, step), so a run
killed at any point resumes from its last checkpoint exactly as if it had not stopped.
Multi-GPU runs are started with torchrun (DDP); the loss gathers features across ranks.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.encoder.align import TextAligner, embed_studies
from cmr_search.encoder.checkpoint import export_encoder, save_checkpoint
from cmr_search.encoder.config import EncoderConfig, TrainConfig
from cmr_search.encoder.data import (
    ClipCorpus,
    ContrastiveBatches,
    apply_augment,
    patient_split,
)
from cmr_search.encoder.loss import ContrastiveLoss, gather_with_grad
from cmr_search.encoder.model import CmrClip
from cmr_search.encoder.registry import EncoderRegistry
from cmr_search.encoder.runlog import (
    metric_row,
    progress_text,
    step_optimizer,
    trim_metric_rows,
    write_metric_rows,
)
from cmr_search.metrics.retrieval import retrieval_summary

__all__ = [
    "ReportCache",
    "TrainResult",
    "Trainer",
    "any_rank",
    "latest_checkpoint",
    "lr_at",
    "micro_step",
]

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: CmrClip, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, tokens and position embeddings; the
    unfrozen BERT layers at their own (lower) learning rate."""
    groups = {(t, d): [] for t in (False, True) for d in (False, True)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "pos_embed" in name or "cls_token" in name or name == "logit_scale"
        groups[(name.startswith("text."), not no_decay)].append(p)
    out = []
    for (is_text, decay), params in groups.items():
        if params:
            lr = cfg.text_lr if is_text else cfg.lr
            out.append({"params": params, "base_lr": lr, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0,
                        "text": is_text})
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (a collective: every rank must call it)."""
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


@dataclass
class TrainResult:
    """Where a training run ended."""

    checkpoint: Path  # the exported model folder STORE/encoders/<model_id>
    model_id: str
    step: int
    seconds: float
    val: dict  # last validation retrieval metrics


def latest_checkpoint(store_root: Path) -> Path:
    """The store's most recently trained encoder (``STORE/encoders/LATEST``)."""
    from cmr_search.store.models import pull_models

    layout = StoreLayout(store_root)
    pull_models(layout)  # on object storage: the shared LATEST and its model
    model_id = layout.latest_model_id()
    if model_id is None:
        raise InputError(f"{store_root} has no trained encoder; run `cmr train-encoder --store {store_root}` "
                         "or pass --checkpoint")
    return layout.encoder(model_id)


class ReportCache:
    """A locked text tower's embeddings of each study's sampled reports (``variants[i]``:
    study i's texts; id ``i * k + v`` is study i's variant v), encoded the first time a batch
    draws one of them. The tower never changes, so its output for a text is the same at
    every step; encoding the reports was a quarter of a CPU training step, and a study is
    encoded once per run (docs/BENCHMARKS.md). A study's variants are encoded together, as
    one batch of fixed composition: padding is then the same in every run, and a resumed
    run stays bit-identical to an uninterrupted one.
    """

    def __init__(self, variants: list[list[str]], model: CmrClip):
        self.variants, self.model = variants, model
        self.k = len(variants[0]) if variants else 0
        self.embeddings = torch.zeros(len(variants) * self.k, model.cfg.dim)
        self.done = torch.zeros(len(variants), dtype=torch.bool)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [len(ids), D] of the texts ``ids`` (CPU)."""
        for study in (ids // self.k).unique().tolist():
            if not self.done[study]:
                rows = slice(study * self.k, (study + 1) * self.k)
                self.embeddings[rows] = self.model.text.encode(self.variants[study]).float().cpu()
                self.done[study] = True
        return self.embeddings[ids]


def micro_step(net, model: CmrClip, loss_fn: ContrastiveLoss, batch: dict, views_per_study: int, amp,
               accum_steps: int = 1, reports: ReportCache | None = None) -> dict[str, torch.Tensor]:
    """Forward (under ``amp``) and backward of one batch of ``{"clips", "texts"}``, or of
    ``{"clips", "report_ids"}`` into ``reports`` (a locked text tower's cache); ``net`` is
    the model or its DDP wrapper, whose features the loss gathers across ranks. uint8
    clips with an ``"augment"`` entry are augmented here, on the model's device. A batch's
    ``"claims"`` (a sentence per study), ``"counterfactuals"`` (K rewrites of each) and
    ``"counterfactual_valid"`` [S, K] are its studies' hard negatives (``claim_loss``)."""
    device = next(model.parameters()).device
    clips = batch["clips"].to(device, non_blocking=True)
    if "augment" in batch:
        clips = apply_augment(clips, batch["augment"], model.cfg.augment, model.cfg.preprocess)
    claims = batch.get("claims")
    if "report_ids" in batch:
        text = reports(batch["report_ids"]).to(device)
    else:
        text = {k: v.to(device) for k, v in model.text.tokenize(batch["texts"]).items()}
    # claims and their rewrites are single sentences: one padded batch of their own
    short = None if claims is None else {
        k: v.to(device) for k, v in model.text.tokenize(claims + batch["counterfactuals"]).items()}
    with amp:
        views, encoded, studies, sentences = net(clips, text, views_per_study, short)
        # claim matching's targets are this rank's: it scores the local texts and studies
        match = None if "claim_targets" not in batch else (
            sentences.float(), studies.float(), batch["claim_targets"].to(device))
        views, encoded, studies = (gather_with_grad(x.float()) for x in (views, encoded, studies))
        # clips are ordered by study, v per study, on every rank alike
        study_of_view = torch.arange(encoded.shape[0], device=device).repeat_interleave(views_per_study)
        hard = {}
        if sentences is not None:
            n, k = batch["counterfactual_valid"].shape
            hard = {"claims": gather_with_grad(sentences[:n].float()),
                    "rewrites": gather_with_grad(sentences[n:].float().view(n, k, -1)),
                    "valid": gather_with_grad(batch["counterfactual_valid"].to(device).float()).bool()}
        out = loss_fn(views, encoded, study_of_view, model.scale(), studies, **hard, match=match)
    (out["loss"] / accum_steps).backward()
    return out


class Trainer:
    """One training run of the contrastive encoder on a store."""

    def __init__(self, store_root: Path, cfg: EncoderConfig, run_dir: Path | None = None,
                 device: str | None = None, resume: bool = False, progress: bool = True, log=print,
                 compile: bool = False):
        self.store_root, self.cfg, self.log, self.progress = Path(store_root), cfg, log, progress
        self.ddp = "LOCAL_RANK" in os.environ
        if self.ddp:
            rank = int(os.environ["LOCAL_RANK"])
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
            self.device = torch.device(f"cuda:{rank}" if torch.cuda.is_available() else "cpu")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.rank, self.world = 0, 1
        t = cfg.train
        self.run_dir = Path(run_dir or StoreLayout(self.store_root).run(f"{cfg.name}-seed{t.seed}"))
        self.ckpt_dir = self.run_dir / "checkpoint"
        if self.ckpt_dir.exists() and not resume:
            raise InputError(f"{self.run_dir} already holds a run; pass --resume to continue it or --run-name for a new one")
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        self.model = CmrClip(cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t), betas=(0.9, 0.98), eps=1e-6)
        self.loss_fn = ContrastiveLoss(cfg.loss.lam, cfg.loss.flood, cfg.loss.study_weight, cfg.loss.hard_weight,
                                       cfg.loss.match_weight)
        self.step, self.elapsed, self.val = 0, 0.0, {}
        self._val_studies = None  # validation studies' embeddings, cached while the video tower is locked
        if resume and self.ckpt_dir.exists():
            self._restore()
        self.corpus = ClipCorpus(self.store_root)
        self.train_studies, self.val_studies = patient_split(self.corpus.with_reports(), t.val_fraction,
                                                             t.seed if t.split_seed is None else t.split_seed)
        self.net = self.model
        if self.ddp:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if compile:  # a run-time choice, not part of the model's config (docs/BENCHMARKS.md)
            self.net = torch.compile(self.net)

    @property
    def augments_on_device(self) -> bool:
        """Whether the training device augments uint8 clips (``train.augment_on``)."""
        on = self.cfg.train.augment_on
        return on == "device" or (on == "auto" and self.device.type == "cuda")

    def _restore(self) -> None:
        meta = json.loads((self.ckpt_dir / "config.json").read_text())
        # through from_dict, so settings added since the run started compare at their defaults
        as_json = lambda cfg: json.loads(json.dumps(cfg.to_dict()))
        if as_json(EncoderConfig.from_dict(meta["config"])) != as_json(self.cfg):
            raise InputError(f"{self.run_dir} was trained with another config; resume it with the same --config")
        self.model.load_state_dict(load_file(self.ckpt_dir / "model.safetensors", device=str(self.device)))
        state = torch.load(self.ckpt_dir / "train_state.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed, self.val = int(state["step"]), float(state["elapsed"]), state.get("val", {})
        if self.rank == 0:  # rows the killed run flushed after its last checkpoint come again
            trim_metric_rows(self.run_dir / "metrics.csv", self.step)
        self.log(f"resumed {self.run_dir.name} at step {self.step}")

    def _checkpoint(self) -> None:
        if self.rank == 0:
            state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed, "val": self.val}
            save_checkpoint(self.model, self.cfg, self.ckpt_dir, self.step, train_state=state)
            trim_metric_rows(self.run_dir / "metrics.csv", self.step)

    def validate(self) -> dict:
        """Text-to-study retrieval on the validation studies: each report queries all of them."""
        if not self.val_studies:
            return {}
        self.model.eval()
        aligning = self.step > self.cfg.train.max_steps
        if aligning and self._val_studies is not None:  # the video tower is locked in the alignment phase
            studies = self._val_studies
        else:
            _, studies = embed_studies(self.model, self.corpus, self.val_studies, self.device)
            self._val_studies = studies if aligning else None
        reports = self.model.text.encode([s.report for s in self.val_studies]).float()
        self.model.train()
        sim = (reports @ studies.t()).numpy()
        return retrieval_summary(sim, np.arange(len(self.val_studies)))

    def fit(self, max_minutes: float | None = None, max_steps: int | None = None) -> TrainResult | None:
        """Train until ``max_steps`` (default: the config's, its alignment phase included) or
        ``max_minutes`` of this call; returns the exported model (None on ranks other than 0)."""
        t, a = self.cfg.train, self.cfg.align
        total = t.max_steps + a.max_steps
        end_step = min(max_steps or total, total)
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else math.inf
        micro = t.accum_steps * self.world
        locked = self.cfg.text.freeze_projection and self.cfg.text.cached_variants > 0
        data = ContrastiveBatches(self.corpus, self.train_studies, t.studies_per_batch, t.views_per_study,
                                  self.cfg.text.sentences, self.cfg.augment, self.cfg.preprocess, t.seed,
                                  length=t.max_steps * micro, stratify_views=t.stratify_views,
                                  report_variants=self.cfg.text.cached_variants if locked else 0,
                                  device_augment=self.augments_on_device, ranks=self.world,
                                  counterfactuals=self.cfg.text.counterfactuals,
                                  claim_targets=self.cfg.loss.match_weight > 0)
        reports = ReportCache(data.variant_texts(), self.model) if locked else None
        indices = [s * micro + m * self.world + self.rank
                   for s in range(self.step, min(end_step, t.max_steps)) for m in range(t.accum_steps)]
        loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=indices, num_workers=t.num_workers,
                                             persistent_workers=False, pin_memory=self.device.type == "cuda")
        aligner = align_it = None
        amp = (torch.autocast("cuda", dtype=torch.bfloat16)
               if self.device.type == "cuda" and t.precision == "bf16" else nullcontext())
        metrics_path = self.run_dir / "metrics.csv"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = self._bar(end_step)
        self.model.train()
        started, window, it = time.monotonic(), [], iter(loader)
        while self.step < end_step and not self._out_of_time(deadline):
            if self.step >= t.max_steps and aligner is None:
                # before the step's seed: making its loader draws from the global generator
                aligner, align_it = self._aligner(end_step)
            # dropout and stochastic depth draw from a generator seeded by the step, so a
            # resumed run repeats exactly what the killed run would have done
            torch.manual_seed(t.seed * 1_000_003 + self.step * self.world + self.rank)
            if self.step < t.max_steps:
                scale = lr_at(self.step, t)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * scale
                for m in range(t.accum_steps):
                    sync = self.net.no_sync() if self.ddp and m < t.accum_steps - 1 else nullcontext()
                    with sync:
                        out = micro_step(self.net, self.model, self.loss_fn, next(it), t.views_per_study, amp,
                                         t.accum_steps, reports)
            else:  # the alignment phase: only the text tower's groups move
                scale = lr_at(self.step - t.max_steps, a)
                for group in self.optimizer.param_groups:
                    group["lr"] = a.lr * scale if group["text"] else 0.0
                out = aligner.step(next(align_it), self.loss_fn, amp)
            step_optimizer(self.model, self.optimizer, t.grad_clip)
            self.step += 1
            self.elapsed += time.monotonic() - started
            started = time.monotonic()
            row = metric_row(out, self.step, self.optimizer, self.model.scale(), self.elapsed)
            if self.rank == 0 and (self.step % t.eval_every == 0 or self.step == end_step):
                self.val = self.validate()
                row |= {f"val_{k}": v for k, v in self.val.items()}
                started = time.monotonic()  # validation time is not training time
            window.append(row)
            if self.rank == 0 and (self.step % 10 == 0 or self.val and "val_R@1" in row):
                write_metric_rows(metrics_path, window)
                window = []
            if self.step % t.checkpoint_every == 0:
                self._checkpoint()
            if bar:
                bar[0].update(bar[1], completed=self.step, description=progress_text(row["loss"], self.val))
        if self.rank == 0:
            write_metric_rows(metrics_path, window)
        if bar:
            bar[0].stop()
        self._checkpoint()
        return self._export()

    def _aligner(self, end_step: int) -> tuple[TextAligner, object]:
        """The alignment phase's cache of video embeddings and its batches from this step on."""
        self.model.eval()  # no dropout or stochastic depth in the targets
        views, pooled = embed_studies(self.model, self.corpus, self.train_studies, self.device)
        self.model.train()
        aligner = TextAligner(self.model, self.corpus, self.train_studies, views, pooled, self.cfg, self.device,
                              self.world)
        indices = [s * self.world + self.rank for s in range(self.step, end_step)]
        loader = torch.utils.data.DataLoader(aligner.batches, batch_size=None, sampler=indices,
                                             num_workers=self.cfg.train.num_workers, persistent_workers=False)
        return aligner, iter(loader)

    def _out_of_time(self, deadline: float) -> bool:
        """Whether the time budget is spent; under DDP every rank stops at the same step (a
        rank's own clock alone would leave one at the export barrier and another in the
        next step's all-reduce, both waiting forever)."""
        late = time.monotonic() >= deadline
        return any_rank(late, self.device) if self.ddp and deadline != math.inf else late

    def _bar(self, end_step: int):
        if not self.progress or self.rank != 0:
            return None
        from cmr_search.core.progress import progress_bar

        bar = progress_bar()
        bar.start()
        return bar, bar.add_task("training", total=end_step, completed=self.step)

    def _export(self) -> TrainResult | None:
        """Copy the weights (no optimizer) to STORE/encoders/<model_id> and point LATEST at it."""
        if self.ddp:
            torch.distributed.barrier()
        if self.rank != 0:
            return None
        model_id, final = export_encoder(self.model, self.cfg, self.store_root, self.step, latest=True)
        EncoderRegistry(self.store_root).note(model_id, "trained", source=f"run {self.run_dir.name}")
        self.log(f"encoder {model_id} after {self.step} steps ({self.elapsed / 60:.1f} min): {final}")
        return TrainResult(final, model_id, self.step, self.elapsed, self.val)
