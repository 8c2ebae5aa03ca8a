"""Zero-shot labels from a pair of prompts, as EchoCLIP and CMR-CLIP classify: no head and no
training labels, the encoder's own text tower is the classifier. Each stored study scores

    cos(study, enc(positive)) - cos(study, enc(negative))

so a study nearer the text stating the finding than the text denying it scores above 0.
With labels, the AUROC of the score with DeLong's interval (``metrics.stats``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from cmr_search.core.exceptions import InputError
from cmr_search.findings.lexicon import FINDINGS
from cmr_search.metrics.stats import auroc_ci

__all__ = ["ZeroShot", "labelled_auroc", "prompt_pair", "prompt_scores", "zero_shot"]

#: ``(model_id, texts) -> [N, D]`` text embeddings: what ``encoder.embed.TextQueryEncoder`` is
TextEncoder = Callable[[str, list[str]], np.ndarray]


def prompt_pair(label: str, positive: str | None = None, negative: str | None = None) -> tuple[str, str]:
    """``(positive, negative)`` prompts of ``label``: the lexicon's phrasing of the finding
    asserted and denied (``findings.FINDINGS``), either one replaced where given."""
    for name, text in (("positive", positive), ("negative", negative)):
        if text is not None and not text.strip():
            raise InputError(f"the --{name} prompt is empty; give the text of the finding "
                             + ("stated" if name == "positive" else "denied"))
    finding = FINDINGS.get(label)
    if finding is not None:
        return positive or finding.positive, negative or finding.negative
    if positive is None or negative is None:
        raise InputError(f"label {label!r} has no default prompts (the lexicon has them for "
                         f"{', '.join(FINDINGS)}); give both --positive TEXT and --negative TEXT")
    return positive, negative


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    # a zero vector (never written by `cmr embed`) scores 0 rather than NaN, which AUROC refuses
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.finfo(np.float64).tiny)


def prompt_scores(studies: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Per study [N, D]: cos(study, positive) - cos(study, negative), in float64 [N]."""
    s = _unit(studies)
    return s @ _unit(positive) - s @ _unit(negative)


def labelled_auroc(values: np.ndarray, scores: np.ndarray, level: float = 0.95) -> dict:
    """AUROC of ``scores`` for 0/1 ``values`` (NaN: no label, left out and counted) with
    DeLong's ``level`` interval: cases are expected to score higher (direction ``<``, never
    chosen from the data, so a model that has the finding backwards shows under 0.5). The
    AUROC and limits are NaN where the labelled studies hold one class only."""
    values, scores = np.asarray(values, np.float64), np.asarray(scores, np.float64)
    known = ~np.isnan(values)
    y = values[known].astype(np.int64)
    out = {"positives": int(y.sum()), "negatives": int(len(y) - y.sum()), "unlabelled": int((~known).sum()),
           "level": level, "auroc": math.nan, "lower": math.nan, "upper": math.nan}
    if out["positives"] and out["negatives"]:
        out["auroc"], out["lower"], out["upper"] = auroc_ci(y, scores[known], level)
    return out


def _json_number(x):
    return None if isinstance(x, float) and math.isnan(x) else x


@dataclass
class ZeroShot:
    """One label scored zero-shot over a model's embedded studies."""

    model_id: str
    label: str
    positive: str
    negative: str
    study_uids: list[str]
    scores: np.ndarray  # [N] cos(study, positive) - cos(study, negative)
    values: np.ndarray | None = None  # [N] the label, NaN where a study has none; None without labels
    auroc: dict | None = None  # ``labelled_auroc`` of the labelled studies
    label_source: str | None = None
    problems: list[str] = field(default_factory=list)  # what the label loader left out, and why

    def summary(self) -> dict:
        """JSON-able: the prompts, the study count and, with labels, the AUROC (NaN as None)."""
        out = {"model_id": self.model_id, "label": self.label, "positive": self.positive,
               "negative": self.negative, "studies": len(self.study_uids)}
        if self.auroc is not None:
            out |= {"label_source": self.label_source, "problems": self.problems,
                    **{k: _json_number(v) for k, v in self.auroc.items()}}
        return out

    def rows(self) -> list[dict]:
        """Per study, highest score first: study_uid, score and, with labels, the label (None
        where missing). No patient identifier."""
        order = sorted(range(len(self.study_uids)), key=lambda i: (-self.scores[i], self.study_uids[i]))
        out = []
        for i in order:
            row = {"study_uid": self.study_uids[i], "score": float(self.scores[i])}
            if self.values is not None:
                row["label"] = None if np.isnan(self.values[i]) else int(self.values[i])
            out.append(row)
        return out

    def write_csv(self, fp: TextIO) -> None:
        """``rows()`` as CSV (header ``study_uid,score[,label]``; a missing label is empty)."""
        rows = self.rows()
        writer = csv.DictWriter(fp, ["study_uid", "score"] + (["label"] if self.values is not None else []),
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def zero_shot(store_root: Path, label: str, positive: str | None = None, negative: str | None = None,
              labels_path: Path | None = None, model_id: str | None = None, level: float = 0.95,
              encode_text: TextEncoder | None = None) -> ZeroShot:
    """Score every embedded study of ``model_id`` (default: the store's default model) for ``label``
    with that encoder's text tower (``encode_text``, default the store's
    ``TextQueryEncoder``); with ``labels_path`` (CSV/Parquet keyed by study_uid, as
    ``cmr heads train`` reads) also the AUROC against its 0/1 ``label`` column."""
    from cmr_search.heads.data import load_bags, load_labels
    from cmr_search.heads.registry import open_store
    from cmr_search.store.search import default_model_id

    positive, negative = prompt_pair(label, positive, negative)
    store = open_store(store_root)
    model_id = model_id or default_model_id(store)
    bags = load_bags(store, model_id, with_views=False)
    label_set = None
    if labels_path is not None:  # before the text tower loads: a wrong file fails in a moment
        label_set = load_labels(store, bags, [label], labels_path)
        if label_set.task != "binary":
            present = label_set.values[~np.isnan(label_set.values)]
            raise InputError(f"label {label!r} of {label_set.source} is not binary (e.g. "
                             f"{present[~np.isin(present, (0.0, 1.0))][0]:g}); zero-shot scores a 0/1 label")
    if encode_text is None:
        from cmr_search.encoder.embed import TextQueryEncoder

        encode_text = TextQueryEncoder(Path(store_root)).plain  # a prompt pair is its own contrast
    try:
        text = np.asarray(encode_text(model_id, [positive, negative]))
    except InputError as error:
        raise InputError(f"zero-shot labels need the text tower of model {model_id}: {error}") from error
    scores = prompt_scores(bags.studies.numpy(), text[0], text[1])
    result = ZeroShot(model_id, label, positive, negative, bags.study_uids, scores)
    if label_set is not None:
        result.values = label_set.values[:, 0]
        result.auroc = labelled_auroc(result.values, scores, level)
        result.label_source, result.problems = label_set.source, label_set.problems
    return result
