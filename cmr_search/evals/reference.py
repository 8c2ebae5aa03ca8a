"""The seed paper's published per-study predictions (rohanshad/cmr_transformer, kept under
``/work/shared/reference/cmr_transformer``) and our recomputation of its statistics: the
per-label AUROCs with DeLong limits and paired tests, and the LVEF regression figures.

``compare_classification`` also recomputes each label the way the authors did (pROC on the
files' rows as they stand, ``direction="auto"``, ``roc.test`` left to choose paired or not) and
names, per label, what separates their numbers from ours; see docs/evaluation_reference.md."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmr_search.core.exceptions import InputError
from cmr_search.metrics.prediction import regression_metrics
from cmr_search.metrics.stats import auroc_ci, delong_test, delong_unpaired_test, proc_direction

__all__ = [
    "MODELS",
    "PAPER_LVEF",
    "Paired",
    "Predictions",
    "compare_classification",
    "compare_lvef",
    "evaluate_prediction_files",
    "paired",
    "read_predictions",
    "reproduce_paper",
]

MODELS = ("contrastive", "kinetics_baseline")  # folder names; the CSV says pretrained/baseline
CLASSIFICATION_DIR = "classification_internal_test"
AUTHORS_CSV = "internal_test_auc_sig_results_combined.csv"
TOLERANCE = 1e-6  # a number "differs" from the authors' when further apart than this

# The paper's LVEF figures as printed (value, decimals printed).
PAPER_LVEF = {
    ("ukbiobank", "contrastive", "mae"): (3.344, 3),
    ("ukbiobank", "contrastive", "mae_sd"): (3.615, 3),
    ("kaggle", "contrastive", "mae"): (6.880, 3),
    ("kaggle", "contrastive", "mae_sd"): (5.309, 3),
    ("kaggle", "contrastive", "loa_low"): (-18.7, 1),
    ("kaggle", "contrastive", "loa_high"): (8.03, 2),
    ("ukbiobank", "contrastive", "hfref_auroc"): (0.880, 3),
    ("kaggle", "contrastive", "hfref_auroc"): (0.949, 3),
    ("ukbiobank", "kinetics_baseline", "hfref_auroc"): (0.751, 3),
    ("kaggle", "kinetics_baseline", "hfref_auroc"): (0.766, 3),
}
LVEF_FILES = {"ukbiobank": "ukbiobank_test", "kaggle": "kaggle_external"}
HFREF_BELOW = 40.0  # LVEF % under which a study counts as heart failure with reduced EF

_SCORE_NAMES = ("score", "scores", "prob", "probs", "pred", "preds", "prediction", "predictions")
_LABEL_NAMES = ("label", "labels", "y", "target", "truth")


@dataclass(frozen=True)
class Predictions:
    """One model's predictions: study ids, scores and true labels, row for row as in the file
    (missing values are NaN)."""

    ids: np.ndarray  # str
    scores: np.ndarray  # float64
    labels: np.ndarray  # float64 (0/1 for a classifier, the measured value for a regression)

    def __len__(self) -> int:
        return len(self.ids)

    def complete(self) -> Predictions:
        """The rows with both a score and a label."""
        keep = np.isfinite(self.scores) & np.isfinite(self.labels)
        return Predictions(self.ids[keep], self.scores[keep], self.labels[keep])

    def duplicated(self) -> np.ndarray:
        """Mask of rows whose id appeared on an earlier row."""
        _, first = np.unique(self.ids, return_index=True)
        mask = np.ones(len(self.ids), bool)
        mask[first] = False
        return mask

    def unique(self) -> Predictions:
        """Each study once, in order of first appearance. A study on several rows (the padding
        of a distributed evaluation repeats a few studies, re-scored on other clips) gets the
        mean of its scores; its labels must agree."""
        if not self.duplicated().any():
            return self
        ids, first, inverse = np.unique(self.ids, return_index=True, return_inverse=True)
        counts = np.bincount(inverse)
        scores = np.bincount(inverse, weights=self.scores) / counts
        lo = np.full(len(ids), np.inf)
        hi = np.full(len(ids), -np.inf)
        np.minimum.at(lo, inverse, self.labels)
        np.maximum.at(hi, inverse, self.labels)
        if (lo != hi).any():
            bad = ids[lo != hi][:3].tolist()
            raise ValueError(f"studies {bad} appear on several rows with different labels")
        order = np.argsort(first)
        return Predictions(ids[order], scores[order], self.labels[first][order])


@dataclass(frozen=True)
class Paired:
    """Two models' predictions of the same studies, aligned by id."""

    ids: np.ndarray
    labels: np.ndarray
    scores_a: np.ndarray
    scores_b: np.ndarray
    only_a: list[str]  # ids that only the first set has
    only_b: list[str]


def _number(value, what: str, row: int) -> float:
    if value is None or (isinstance(value, str) and value.strip() in ("", "NA", "NaN", "nan")):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"row {row}: {what} {value!r} is not a number") from None


def _build(rows: list, path: Path) -> Predictions:
    if not rows:
        raise ValueError(f"{path}: no prediction rows")
    ids, scores, labels = [], [], []
    for k, (i, s, y) in enumerate(rows):
        if i is None or str(i).strip() == "":
            raise ValueError(f"{path}: row {k} has no study id")
        ids.append(str(i))
        scores.append(_number(s, "score", k))
        labels.append(_number(y, "label", k))
    return Predictions(np.array(ids), np.array(scores), np.array(labels))


def _pick(columns: list[str], names: tuple[str, ...], what: str, path: Path) -> int:
    lowered = [c.strip().lower() for c in columns]
    for n in names:
        if n in lowered:
            return lowered.index(n)
    raise ValueError(f"{path}: no {what} column; expected one named {' or '.join(names)}, "
                     f"got {columns}")


def read_predictions(path: str | Path) -> Predictions:
    """Read a prediction table: the experiment tracker's JSON (``{"columns": [id, "probs" or
    "preds", "labels"], "data": [[...], ...]}``, values as strings or null) or a CSV whose first
    column is the study id, with a score column (score/probs/preds/prediction) and a label
    column (label/labels/y)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prediction file at {path}")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(table, dict) or "columns" not in table or "data" not in table:
            raise ValueError(f"{path}: expected a table with 'columns' and 'data'")
        columns = list(table["columns"])
        si = _pick(columns, _SCORE_NAMES, "score", path)
        yi = _pick(columns, _LABEL_NAMES, "label", path)
        rows = table["data"]
        if any(not isinstance(r, list) or len(r) != len(columns) for r in rows):
            raise ValueError(f"{path}: every row of 'data' must have {len(columns)} values")
        return _build([(r[0], r[si], r[yi]) for r in rows], path)
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or len(header) < 3:
        raise ValueError(f"{path}: expected a CSV header with an id, a score and a label column")
    si = _pick(header, _SCORE_NAMES, "score", path)
    yi = _pick(header, _LABEL_NAMES, "label", path)
    rows = []
    for k, r in enumerate(reader):
        if not r:
            continue
        if len(r) != len(header):
            raise ValueError(f"{path}: row {k} has {len(r)} values, the header {len(header)}")
        rows.append((r[0], r[si], r[yi]))
    return _build(rows, path)


def paired(a: Predictions, b: Predictions) -> Paired:
    """Align two models' predictions by study id (each study once; rows missing a score or
    label are dropped). The labels of a study must agree."""
    a, b = a.complete().unique(), b.complete().unique()
    where_b = {i: k for k, i in enumerate(b.ids)}
    common = [k for k, i in enumerate(a.ids) if i in where_b]
    kb = np.array([where_b[a.ids[k]] for k in common], dtype=np.int64)
    ka = np.array(common, dtype=np.int64)
    disagree = a.labels[ka] != b.labels[kb]
    if disagree.any():
        raise ValueError(f"{int(disagree.sum())} studies have different labels in the two sets, "
                         f"e.g. {a.ids[ka][disagree][:3].tolist()}")
    in_a = set(a.ids.tolist())
    return Paired(a.ids[ka], a.labels[ka], a.scores[ka], b.scores[kb],
                  only_a=sorted(set(a.ids.tolist()) - set(where_b)),
                  only_b=sorted(i for i in b.ids.tolist() if i not in in_a))


def _authors(reference_dir: Path) -> dict[str, dict]:
    path = reference_dir / CLASSIFICATION_DIR / AUTHORS_CSV
    with open(path, newline="") as fp:
        return {r["target"]: r for r in csv.DictReader(fp)}


def _their_procedure(a: Predictions, b: Predictions) -> dict:
    """The authors' numbers as pROC gives them on the files' rows as they stand: every row
    (duplicates too), ``direction="auto"`` per model, and ``roc.test(method="delong")``, which
    pairs rows by position when the two label vectors are identical and otherwise runs the
    unpaired test."""
    out = {}
    dirs = []
    for tag, p in (("contrastive", a), ("baseline", b)):
        d = proc_direction(p.labels, p.scores)
        out[f"auc_{tag}"], out[f"lower_{tag}"], out[f"upper_{tag}"] = auroc_ci(
            p.labels, p.scores, direction=d)
        out[f"direction_{tag}"] = d
        dirs.append(d)
    out["row_paired"] = bool(np.array_equal(a.labels, b.labels))
    if out["row_paired"]:
        out["p_val"] = delong_test(a.labels, a.scores, b.scores, direction=tuple(dirs))
    else:
        out["p_val"] = delong_unpaired_test(a.labels, a.scores, b.labels, b.scores,
                                            direction=tuple(dirs))[2]
    return out


def compare_classification(reference_dir: str | Path) -> list[dict]:
    """Per disease label: our AUROC and 95 % DeLong limits for both models and the paired
    DeLong p-value (each study once, paired by id, controls < cases), beside the authors'
    (``*_theirs``), the differences, and ``explanation``: ``"+"``-joined codes of what
    reproduces their numbers (empty when nothing differs); ``reproduced`` says whether
    recomputing their way gives their figures to 1e-6.

    Codes: ``duplicate_rows`` (they counted the files' repeated rows twice),
    ``auto_direction_contrastive``/``auto_direction_baseline`` (pROC's automatic direction
    flipped that model's curve: they report 1 - AUROC), ``row_paired`` (their paired test paired
    the files' rows by position, not by study), ``unpaired_test`` (their label vectors differ
    in row order, so pROC ran the unpaired test), ``unexplained``."""
    reference_dir = Path(reference_dir)
    authors = _authors(reference_dir)
    folder = reference_dir / CLASSIFICATION_DIR
    out = []
    for label in sorted(authors):
        a = read_predictions(folder / MODELS[0] / f"{label}.table.json")
        b = read_predictions(folder / MODELS[1] / f"{label}.table.json")
        pair = paired(a, b)
        row = {"label": label, "rows_contrastive": len(a), "rows_baseline": len(b),
               "duplicates_contrastive": int(a.duplicated().sum()),
               "duplicates_baseline": int(b.duplicated().sum()), "studies": len(pair.ids),
               "cases": int(pair.labels.sum()), "only_one_model": len(pair.only_a) + len(pair.only_b)}
        for tag, s in (("contrastive", pair.scores_a), ("baseline", pair.scores_b)):
            row[f"auc_{tag}"], row[f"lower_{tag}"], row[f"upper_{tag}"] = auroc_ci(pair.labels, s)
        row["p_val"] = delong_test(pair.labels, pair.scores_a, pair.scores_b)
        theirs = authors[label]
        their_way = _their_procedure(a.complete(), b.complete())
        keys = [f"{k}_{t}" for t in ("contrastive", "baseline") for k in ("auc", "lower", "upper")]
        keys.append("p_val")
        csv_key = {k: k.replace("contrastive", "pretrained") for k in keys}
        for k in keys:
            row[f"{k}_theirs"] = float(theirs[csv_key[k]])
            row[f"{k}_diff"] = row[k] - row[f"{k}_theirs"]
        row["reproduced"] = all(abs(their_way[k] - row[f"{k}_theirs"]) <= TOLERANCE
                                for k in keys)
        row["explanation"] = _explain(row, keys, their_way, a, b)
        out.append(row)
    return out


def _explain(row: dict, keys: list[str], their_way: dict, a: Predictions, b: Predictions) -> str:
    codes = []
    auc_keys = [k for k in keys if k != "p_val"]
    if any(abs(row[f"{k}_diff"]) > TOLERANCE for k in auc_keys):
        if a.duplicated().any() or b.duplicated().any():
            codes.append("duplicate_rows")
        codes += [f"auto_direction_{t}" for t in ("contrastive", "baseline")
                  if their_way[f"direction_{t}"] == ">"]
    if abs(row["p_val_diff"]) > TOLERANCE or (
            row["p_val_theirs"] > 0 and abs(row["p_val_diff"]) / row["p_val_theirs"] > 1e-3):
        codes.append("row_paired" if their_way["row_paired"] else "unpaired_test")
    if codes and not row["reproduced"]:
        codes.append("unexplained")
    return "+".join(codes)


def _truncate(x: float, decimals: int) -> float:
    return math.trunc(x * 10**decimals) / 10**decimals


def _paper_check(ours: float, printed: float, decimals: int) -> str:
    """How the paper's printed figure relates to ours: rounded, truncated, or differs."""
    if round(ours, decimals) == printed:
        return "rounded"
    if _truncate(ours, decimals) == printed:
        return "truncated"
    return "differs"


def compare_lvef(reference_dir: str | Path) -> dict:
    """LVEF regression on UK Biobank and Kaggle, contrastive and baseline: MAE with the sample
    sd of the absolute errors (``mae_sd``; ``mae_sd_ddof0`` beside it), RMSE, Pearson r, the
    Bland-Altman bias and 95 % limits (prediction - truth), and HFrEF (true LVEF < 40 %)
    AUROC of the prediction (lower predicted LVEF = more likely) with DeLong limits, plus the
    paired DeLong p of the two models. ``paper`` lists each printed figure beside ours and
    whether it is ours rounded, truncated, or different."""
    folder = Path(reference_dir) / "lvef_regression"
    out: dict = {}
    for cohort, stem in LVEF_FILES.items():
        preds = {m: read_predictions(folder / f"{stem}_{m}.table.json").complete().unique()
                 for m in MODELS}
        out[cohort] = {}
        for model, p in preds.items():
            m = regression_metrics(p.labels, p.scores)
            abs_err = np.abs(p.scores - p.labels)
            hf = (p.labels < HFREF_BELOW).astype(np.int64)
            auc, lo, hi = auroc_ci(hf, -p.scores)
            out[cohort][model] = m | {
                "mae_sd": float(abs_err.std(ddof=1)), "mae_sd_ddof0": float(abs_err.std(ddof=0)),
                "hfref_cases": int(hf.sum()), "hfref_auroc": auc, "hfref_lower": lo,
                "hfref_upper": hi}
        pair = paired(*preds.values())
        out[cohort]["hfref_p_val"] = delong_test((pair.labels < HFREF_BELOW).astype(np.int64),
                                                 -pair.scores_a, -pair.scores_b)
    out["paper"] = [
        {"cohort": c, "model": m, "figure": f, "printed": v, "ours": out[c][m][f],
         "match": _paper_check(out[c][m][f], v, d)}
        for (c, m, f), (v, d) in PAPER_LVEF.items()]
    return out


def reproduce_paper(reference_dir: str | Path) -> dict:
    """Everything ``cmr eval --reference DIR`` reports: the 35 labels against the authors'
    table and the LVEF figures against the paper's."""
    reference_dir = Path(reference_dir)
    if not (reference_dir / CLASSIFICATION_DIR / AUTHORS_CSV).exists():
        raise InputError(f"{reference_dir} is not the seed paper's prediction folder (no "
                         f"{CLASSIFICATION_DIR}/{AUTHORS_CSV}); see ../shared/reference/cmr_transformer")
    return {"classification": compare_classification(reference_dir), "lvef": compare_lvef(reference_dir)}


def _is_binary(labels: np.ndarray) -> bool:
    return bool(len(labels)) and bool(np.isin(labels, (0.0, 1.0)).all())


def _score_one(p: Predictions, level: float) -> dict:
    if _is_binary(p.labels):
        if not 0 < p.labels.sum() < len(p.labels):
            return {"n": len(p), "cases": int(p.labels.sum()), "auroc": float("nan")}
        auc, lo, hi = auroc_ci(p.labels, p.scores, level)
        return {"n": len(p), "cases": int(p.labels.sum()), "auroc": auc, "lower": lo, "upper": hi}
    out = regression_metrics(p.labels, p.scores) | {"mae_sd": float(np.abs(p.scores - p.labels).std(ddof=1))}
    hf = (p.labels < HFREF_BELOW).astype(np.int64)
    if 0 < hf.sum() < len(hf):
        auc, lo, hi = auroc_ci(hf, -p.scores, level)
        out |= {"hfref_cases": int(hf.sum()), "hfref_auroc": auc, "hfref_lower": lo, "hfref_upper": hi}
    return out


def evaluate_prediction_files(path: str | Path, baseline_path: str | Path | None = None,
                              level: float = 0.95) -> dict:
    """Score a prediction file as the paper's tables do (each study once): AUROC with DeLong
    limits for 0/1 labels, or the LVEF figures for a measured value; with a second file, the
    same for it and the paired DeLong test over the studies both hold."""
    try:
        a = read_predictions(path).complete().unique()
        out = {"file": Path(path).name, "studies": len(a), "model": _score_one(a, level)}
        if baseline_path is None:
            return out
        b = read_predictions(baseline_path).complete().unique()
        pair = paired(a, b)
    except (OSError, ValueError) as error:
        raise InputError(str(error)) from None
    out |= {"baseline_file": Path(baseline_path).name, "baseline": _score_one(b, level),
            "paired_studies": len(pair.ids), "only_one_file": len(pair.only_a) + len(pair.only_b)}
    if _is_binary(pair.labels):
        out["p_delong"] = delong_test(pair.labels, pair.scores_a, pair.scores_b)
    else:
        hf = (pair.labels < HFREF_BELOW).astype(np.int64)
        out["hfref_p_delong"] = delong_test(hf, -pair.scores_a, -pair.scores_b)
    return out
