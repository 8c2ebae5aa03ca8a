"""Training data from a clip store: studies with their clips and reports, patient-level
splits, report sentence sampling and frame-consistent clip augmentation.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches the
killed run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmr_search.core.exceptions import StoreError
from cmr_search.encoder.config import AugmentConfig
from cmr_search.encoder.text import split_sentences
from cmr_search.encoder.video import PreprocessConfig, preprocess_batch

__all__ = ["ClipCorpus", "ContrastiveBatches", "Study", "apply_augment", "augment_batch", "eval_clips", "patient_split",
           "sample_augment", "sample_report"]

META_COLUMNS = ["clip_id", "study_uid", "patient_key", "view", "slice_index"]
STRATA = ("4CH", "3CH", "2CH", "SAX")  # view types a stratified batch is drawn from


@dataclass
class Study:
    """One study: its report and the store rows of its clips."""

    study_uid: str
    patient_key: str
    report: str | None
    row_ids: list[int]
    clip_ids: list[str]
    views: list[str]
    slice_index: list[int]


class ClipCorpus:
    """The clips and reports of a store, grouped by study; pixels are read on demand by row id.

    The Lance row ids are pinned to the table version seen at construction, so a concurrent
    ingest cannot shift them under a running job.
    """

    def __init__(self, store_root: Path):
        from cmr_search.store.clip_store import ClipStore

        self.store_root = Path(store_root)
        store = ClipStore.open(self.store_root)
        self.clip_shape = (store.clip_config.frames, store.clip_config.size, store.clip_config.size)
        if not store.has_table("clips") or store.count_clips() == 0:
            raise StoreError(f"{store_root} holds no clips; run `cmr ingest ... --store {store_root}` first")
        self.version = store.clips.version
        self._table = None
        self._pid = None
        meta = self.metadata(META_COLUMNS).to_pydict()
        reports: dict[str, str] = {}
        if store.has_table("reports"):
            rep = store.db.open_table("reports").to_arrow().to_pydict()
            reports = dict(zip(rep["study_uid"], rep["report"]))
        by_study: dict[str, Study] = {}
        order = np.lexsort((np.asarray(meta["slice_index"]), np.asarray(meta["view"]), np.asarray(meta["study_uid"])))
        for i in order:
            uid = meta["study_uid"][i]
            s = by_study.setdefault(uid, Study(uid, meta["patient_key"][i], reports.get(uid), [], [], [], []))
            s.row_ids.append(int(meta["_rowid"][i]))
            s.clip_ids.append(meta["clip_id"][i])
            s.views.append(meta["view"][i])
            s.slice_index.append(int(meta["slice_index"][i] or 0))
        self.studies = [by_study[k] for k in sorted(by_study)]

    def _clips_table(self):
        # lancedb's native runtime must not cross a fork: each process opens its own handle
        if self._table is None or self._pid != os.getpid():
            from cmr_search.store.clip_store import ClipStore

            table = ClipStore.open(self.store_root).clips
            table.checkout(self.version)
            self._table, self._pid = table, os.getpid()
        return self._table

    def metadata(self, columns: list[str]):
        """Clip columns (no pixels) of every row at the pinned version, with ``_rowid``."""
        return self._clips_table().search().select(columns).with_row_id(True).limit(None).to_arrow()

    def read_clips(self, row_ids: list[int]) -> np.ndarray:
        """uint8 clips [N, T, H, W] for store row ids, in the order given."""
        if not row_ids:
            return np.empty((0, *self.clip_shape), np.uint8)
        got = self._clips_table().take_row_ids(sorted(set(row_ids))).select(["clip"]).with_row_id().to_arrow()
        by_id = dict(zip(got["_rowid"].to_pylist(), got["clip"].to_pylist()))
        return np.stack([np.frombuffer(by_id[r], np.uint8).reshape(self.clip_shape) for r in row_ids])

    def with_reports(self, studies: list[Study] | None = None) -> list[Study]:
        """The studies that have a report (only those can be trained on)."""
        return [s for s in (self.studies if studies is None else studies) if s.report and s.report.strip()]


def patient_split(studies: list[Study], val_fraction: float, seed: int) -> tuple[list[Study], list[Study]]:
    """(train, validation) with every patient on one side only; stable for a given seed."""

    def u(key: str) -> float:
        return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)

    val = [s for s in studies if u(s.patient_key) < val_fraction]
    train = [s for s in studies if u(s.patient_key) >= val_fraction]
    return train, val


def sample_report(report: str, k: int, rng: np.random.Generator) -> str:
    """k sentences of the report, drawn without replacement, in random order (paper: 5)."""
    sentences = split_sentences(report)
    if len(sentences) <= k:
        picked = list(rng.permutation(len(sentences)))
    else:
        picked = list(rng.choice(len(sentences), size=k, replace=False))
    return " ".join(sentences[i] for i in picked)


def sample_augment(b: int, cfg: AugmentConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random parameters of ``b`` clips' augmentation, drawn from ``gen`` (CPU): an affine
    grid ``theta`` [b, 2, 3] (resized crop, rotation, optional flip), ``contrast``,
    ``brightness`` and ``gamma`` [b], and ``noise_seed`` for the Gaussian noise. A few
    hundred bytes, so a loader can hand them to the training device with uint8 clips."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    area = uniform(*cfg.scale)
    log_ratio = uniform(math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    sx = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # crop width as a fraction of the frame
    sy = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    cx = (2 * torch.rand(b, generator=gen) - 1) * (1 - sx)
    cy = (2 * torch.rand(b, generator=gen) - 1) * (1 - sy)
    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(b)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([flip * sx * cos, -sy * sin, cx], 1), torch.stack([flip * sx * sin, sy * cos, cy], 1)], 1
    )  # [B, 2, 3]: output grid -> input coordinates
    return {
        "theta": theta,
        "contrast": uniform(1 - cfg.contrast, 1 + cfg.contrast),
        "brightness": uniform(-cfg.brightness, cfg.brightness),
        "gamma": uniform(1 - cfg.gamma, 1 + cfg.gamma),
        "noise_seed": torch.randint(1 << 62, (1,), generator=gen),
    }


def apply_augment(clips: torch.Tensor, params: dict[str, torch.Tensor], cfg: AugmentConfig,
                  pre: PreprocessConfig) -> torch.Tensor:
    """uint8 clips [B, T, H, W] -> augmented, normalised [B, 3, T, crop, crop], on the
    clips' device: one ``grid_sample`` warps every frame of a clip alike, then contrast,
    brightness, gamma and noise. The noise comes from a generator on that device seeded
    by ``params``, so a given batch is the same on every run on the same kind of device."""
    b, t = clips.shape[:2]
    dev = clips.device
    x = clips.float() / 255.0
    grid = F.affine_grid(params["theta"].to(dev), [b, t, pre.crop, pre.crop], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast, bright, gamma = (params[k].to(dev).view(b, 1, 1, 1) for k in ("contrast", "brightness", "gamma"))
    x = (x.clamp(0, 1) ** gamma) * contrast + bright
    if cfg.noise:
        noise_gen = torch.Generator(device=dev).manual_seed(int(params["noise_seed"]))
        x = x + cfg.noise * torch.randn(x.shape, generator=noise_gen, device=dev)
    x = (x.clamp(0, 1) * 255.0 - pre.pixel_mean) / pre.pixel_std
    return x.unsqueeze(1).expand(b, 3, t, pre.crop, pre.crop).contiguous()


def augment_batch(clips: torch.Tensor, cfg: AugmentConfig, pre: PreprocessConfig,
                  gen: torch.Generator) -> torch.Tensor:
    """uint8 clips [B, T, H, W] -> augmented, normalised [B, 3, T, crop, crop]: a random
    resized crop, rotation (and optional flip) per clip, the same for all of its frames;
    then contrast, brightness, gamma and noise (``sample_augment`` + ``apply_augment``)."""
    return apply_augment(clips, sample_augment(clips.shape[0], cfg, gen), cfg, pre)


class ContrastiveBatches(torch.utils.data.Dataset):
    """Item ``step`` is that step's batch: ``studies_per_batch`` studies, ``views_per_study``
    clips each, a sampled report per study, augmented clips. With ``device_augment`` the
    clips stay uint8 and the batch carries their augmentation's parameters
    (``sample_augment``), for the training device to apply: a quarter of the bytes of the
    float clips at one channel, a twelfth at the model's three. Without ``clips`` the batch
    names its clips by store row id (``"rows"``) instead of carrying them: the text
    alignment looks their embeddings up in its cache (``encoder/align.py``)."""

    def __init__(self, corpus: ClipCorpus, studies: list[Study], studies_per_batch: int, views_per_study: int,
                 sentences: int, augment: AugmentConfig, pre: PreprocessConfig, seed: int, length: int,
                 stratify_views: float = 0.0, report_variants: int = 0, device_augment: bool = False,
                 ranks: int = 1, counterfactuals: int = 0, clips: bool = True, claim_targets: bool = False):
        if not studies:
            raise StoreError("no training studies with a report; import reports with `cmr ingest --reports CSV`")
        self.corpus, self.studies = corpus, studies
        # items i*ranks .. i*ranks + ranks-1 are one step's micro-batches on the ranks (DDP),
        # whose features are gathered into one batch: they draw disjoint studies
        self.ranks = ranks
        self.s = min(studies_per_batch, max(1, len(studies) // ranks))
        self.v, self.k = views_per_study, sentences
        self.augment, self.pre, self.seed, self.length = augment, pre, seed, length
        self.stratify_views = stratify_views
        self.report_variants = report_variants
        self.device_augment = device_augment
        self.counterfactuals = counterfactuals
        self.clips = clips
        self.claim_targets = claim_targets and counterfactuals > 0
        self._parser = None  # the findings parser, built on first use in each worker
        self._said: dict[int, dict] = {}  # study index -> what its whole report says (summarise)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parser": None, "_said": {}}

    def __len__(self) -> int:
        return self.length

    def study_indices(self, step: int) -> np.ndarray:
        """Studies of item ``step``: consecutive slices of a per-epoch permutation (every
        study once per epoch). The ``ranks`` items gathered together always come from one
        epoch, so a study is never in one gathered batch twice (its copies would be each
        other's negatives)."""
        n = len(self.studies)
        group, rank = divmod(step, self.ranks)
        per_epoch = max(1, n // (self.s * self.ranks))
        epoch, pos = divmod(group, per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        start = (pos * self.ranks + rank) * self.s
        return perm[start : start + self.s]

    def variant_texts(self) -> list[list[str]]:
        """The ``report_variants`` sampled reports of every study (deterministic per seed):
        what a locked text tower embeds once, before training."""
        return [[self._variant(i, v) for v in range(self.report_variants)] for i in range(len(self.studies))]

    def _variant(self, i: int, v: int) -> str:
        return sample_report(self.studies[i].report, self.k, np.random.default_rng([self.seed, i, 2, v]))

    def counterfactual_texts(self, texts: list[str], step: int) -> tuple[list[str], list[str], torch.Tensor]:
        """Each sampled report's claim, a sentence that states a finding (drawn among them;
        half the time restated plainly, "Severe LV dilatation.", as the rewrites and most
        queries are phrased), and ``counterfactuals`` rewrites of it (`findings.rewrite`), from their own stream
        of the step's seed -> (claims [S], rewrites [S·K], valid [S, K]). A report with no
        finding, or fewer possible edits, pads with empty texts that ``valid`` leaves out."""
        # imported here: spaCy loads only for runs that rewrite reports
        from cmr_search.findings.parse import FindingParser, summarise
        from cmr_search.findings.rewrite import counterfactuals, plain_sentence

        if self._parser is None:
            self._parser = FindingParser()
        rng = np.random.default_rng([self.seed, step, 3])
        k = self.counterfactuals
        claims, rewrites, valid = [], [], torch.zeros(len(texts), k, dtype=torch.bool)
        for j, (text, (mentions, sentences)) in enumerate(zip(texts, self._parser.read_many(texts))):
            claim, made = "", []
            # "Normal study" denies every finding at once: a claim about one finding each is
            # what a rewrite can turn around, and a normal study's claim would add a third
            # more texts to every step (measured: 1.5x the CPU step time) for little signal
            mentions = [m for m in mentions if not m.whole_study]
            if mentions:
                chosen = mentions[int(rng.integers(len(mentions)))]
                if rng.random() < 0.5:
                    start, end = sentences[chosen.sentence]
                    claim = text[start:end]
                else:
                    # half the claims in the rewrites' own plain phrasing, so that phrasing
                    # is no clue to which text is the rewrite
                    st = summarise(mentions)[chosen.finding]
                    claim = plain_sentence(st.finding, st.present, st.grade, rng)
                made = [c.text for c in counterfactuals(self._parser, claim, rng, k)]
            valid[j, : len(made)] = True
            claims.append(claim)
            rewrites += made + [""] * (k - len(made))
        return claims, rewrites, valid

    def __getitem__(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step, 1])
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
        rows, study_of_view, texts, variants = [], [], [], []
        group = STRATA[rng.integers(len(STRATA))] if rng.random() < self.stratify_views else None
        studies = self.study_indices(step)
        for j, i in enumerate(studies):
            st = self.studies[i]
            # a study without the step's view type falls back to all its clips
            pool = [r for r, v in zip(st.row_ids, st.views) if v == group] if group else []
            pool = pool or st.row_ids
            # exactly v clips per study (a short study repeats clips, each augmented anew), so the
            # batch reshapes to [studies, v] for pooling and gathers evenly across ranks
            pick = rng.choice(len(pool), size=self.v, replace=len(pool) < self.v)
            rows += [pool[p] for p in pick]
            study_of_view += [j] * len(pick)
            if self.report_variants:
                variants.append(int(rng.integers(self.report_variants)))
            else:
                texts.append(sample_report(st.report, self.k, rng))
        batch = {"study_of_view": torch.tensor(study_of_view), "studies": torch.as_tensor(studies), "step": step}
        if not self.clips:
            batch["rows"] = torch.tensor(rows)
        else:
            clips = torch.from_numpy(self.corpus.read_clips(rows))
            if self.device_augment:
                batch |= {"clips": clips, "augment": sample_augment(len(clips), self.augment, gen)}
            else:
                batch["clips"] = augment_batch(clips, self.augment, self.pre, gen)
        if self.report_variants:  # indices into the embeddings of ``variant_texts``
            batch["report_ids"] = torch.as_tensor(studies, dtype=torch.long) * self.report_variants + torch.tensor(variants)
        else:
            batch["texts"] = texts
        if self.counterfactuals:
            sampled = texts or [self._variant(int(i), v) for i, v in zip(studies, variants)]
            batch["claims"], batch["counterfactuals"], batch["counterfactual_valid"] = self.counterfactual_texts(sampled, step)
            if self.claim_targets:
                batch["claim_targets"] = self.match_targets(batch["claims"] + batch["counterfactuals"], studies)
        return batch

    def match_targets(self, texts: list[str], studies: np.ndarray) -> torch.Tensor:
        """[len(texts), len(studies)] int8: 1 where a study's whole report bears a text out,
        0 where it says otherwise, -1 where it is silent (``findings.parse.agreement``)."""
        from cmr_search.findings.parse import agreement, summarise

        missing = [int(i) for i in studies if int(i) not in self._said]
        for i, mentions in zip(missing, self._parser.parse_many([self.studies[i].report for i in missing])):
            self._said[i] = summarise(mentions)
        claims = [summarise(m) for m in self._parser.parse_many(texts)]
        return torch.tensor([[agreement(c, self._said[int(i)]) for i in studies] for c in claims], dtype=torch.int8)


def eval_clips(corpus: ClipCorpus, study: Study, pre: PreprocessConfig) -> torch.Tensor:
    """All clips of a study, preprocessed without augmentation: [N, 3, T, crop, crop]."""
    return preprocess_batch(torch.from_numpy(corpus.read_clips(study.row_ids)), pre)
