"""``cmr eval``: every measure of a store's embeddings in one run. Reads the embeddings, the
labels, the reports and the head registry; fits the evaluation's own heads; returns the
numbers (JSON-able) and the figures (PNG bytes) that ``evals.report`` lays out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cmr_search.core.exceptions import InputError
from cmr_search.evals.config import EvalConfig

__all__ = ["Evaluation", "evaluate_store"]


@dataclass
class Evaluation:
    """What one run found: ``metrics`` (JSON-able), ``figures`` (name -> PNG), stage times."""

    metrics: dict = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _Stages:
    """Times each stage and tells the user which one is running."""

    def __init__(self, result: Evaluation, log):
        self.result, self.log = result, log

    def __call__(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                self.started = time.perf_counter()
                if stages.log:
                    stages.log(f"eval: {name} ...")

            def __exit__(self, *exc):
                stages.result.seconds[name] = round(time.perf_counter() - self.started, 2)
                if stages.log and exc[0] is None:
                    stages.log(f"eval: {name} done in {stages.result.seconds[name]:.1f} s")

        return _Stage()


def _label_values(store, bags, labels_path: Path | None):
    """Every numeric label column aligned with ``bags`` (NaN where a study has no value)
    -> (the label table, {name: column})."""
    from cmr_search.evals.efficiency import aligned_columns
    from cmr_search.heads.data import label_table

    table, _, _ = label_table(store, labels_path)
    out = aligned_columns(table, bags.study_uids)
    if not out:
        raise InputError("the label table has no numeric columns to evaluate against")
    return table, out


def _reports(store, study_uids: list[str]) -> list[str | None]:
    clip_store = store.clip_store
    if not clip_store.has_table("reports"):
        return [None] * len(study_uids)
    table = clip_store.db.open_table("reports").to_arrow()
    text = dict(zip(table["study_uid"].to_pylist(), table["report"].to_pylist()))
    return [text.get(u) for u in study_uids]


def evaluate_store(store_root: Path, cfg: EvalConfig | None = None, model_id: str | None = None,
                   labels_path: Path | None = None, index_config=None, log=print,
                   externals: list[Path] | None = None) -> Evaluation:
    """Evaluate the embeddings of ``model_id`` (default: the store's default model) against the
    store's labels and reports, and against the random-init baseline (``cfg.baseline``); with
    ``externals``, the same model's heads on other sites' stores (``evals/external.py``)."""
    from cmr_search.encoder.embed import TextQueryEncoder
    from cmr_search.heads.data import load_bags
    from cmr_search.store.embedding_store import EmbeddingStore
    from cmr_search.store.search import Searcher, default_model_id
    from cmr_search.store.withdrawal import finish_pending_withdrawals

    cfg = cfg or EvalConfig()
    result = Evaluation()
    stage = _Stages(result, log)
    store = EmbeddingStore.open(Path(store_root))
    finish_pending_withdrawals(store)
    model_id = model_id or default_model_id(store)
    models = {"contrastive": model_id}
    with stage("baseline embeddings"):
        if cfg.baseline == "random":
            from cmr_search.evals.baseline import embed_random_baseline

            models["baseline"] = embed_random_baseline(store_root, model_id, cfg.baseline_seed, index_config,
                                                       progress=log is not None)
    with stage("load"):
        from cmr_search.evals.efficiency import align_bags, phenotype_columns

        bags = align_bags({name: load_bags(store, mid) for name, mid in models.items()})
        main = bags["contrastive"]
        table, labels = _label_values(store, main, labels_path)
        phenotypes = [p for p in phenotype_columns(table) if p in labels]
    result.metrics["run"] = {"store": str(store_root), "models": models, "studies": len(main),
                             "patients": len(np.unique(main.patient_keys)), "views": int(main.mask.sum()),
                             "phenotypes": phenotypes, "config": cfg.to_dict()}
    with stage("text-to-scan retrieval"):
        text_encoder = TextQueryEncoder(store_root)
        searcher = Searcher(Path(store_root), model_id, index_config, encode_text=text_encoder)

        # a whole report and a zero-shot prompt pair are embedded as the text tower reads
        # them; queries as the search composes them from their findings (encoder/query.py)
        def raw_text(texts: list[str]) -> np.ndarray:
            return text_encoder.plain(model_id, texts)

        result.metrics["text_retrieval"] = _text_retrieval(searcher, raw_text, store, main, labels, cfg)
    with stage("scan-to-scan"):
        from cmr_search.evals.queries import scan_to_scan_eval

        result.metrics["scan_to_scan"] = {
            name: scan_to_scan_eval(b.studies.numpy(), labels, phenotypes, labels.get("lvef"), b.patient_keys, cfg.k)
            for name, b in bags.items()}
    with stage("heads"):
        disease = _heads(bags, store, labels, phenotypes, labels_path, cfg, result)
    with stage("zero-shot labels"):
        from cmr_search.evals.zeroshot import zero_shot_labels

        result.metrics["zero_shot"] = {"model_id": model_id, **zero_shot_labels(
            raw_text, main, labels, phenotypes, disease.get("contrastive"), cfg.level)}
    if externals:
        with stage("external validation"):
            from cmr_search.evals.external import external_validation

            result.metrics["external"] = external_validation(store_root, list(externals), model_id, cfg, text_encoder,
                                                             index_config, log)
    with stage("registered heads"):
        result.metrics["registered_heads"] = _registered_heads(store_root)
    with stage("clusters and maps"):
        _clusters(store, models, bags, labels, phenotypes, cfg, result)
    result.metrics["seconds"] = result.seconds
    return result


def _text_retrieval(searcher, raw_text, store, bags, labels: dict, cfg: EvalConfig) -> dict:
    from cmr_search.evals.queries import (
        negation_pairs,
        own_report_retrieval,
        phrase_queries,
        phrase_query_eval,
        severity_confusion,
        summarise_by_kind,
    )

    studies = bags.studies.numpy()
    out: dict = {}
    reports = _reports(store, bags.study_uids)
    have = [i for i, r in enumerate(reports) if r]
    if have:
        vectors = raw_text([reports[i] for i in have])
        out["own_report"] = own_report_retrieval(vectors, studies[have])
    queries = phrase_queries(labels.keys())
    if queries:
        vectors = searcher.encode_text([q.text for q in queries])
        rows = phrase_query_eval(vectors, studies, queries, labels, cfg.k)
        out |= {"queries": rows, "by_kind": summarise_by_kind(rows), "negation": negation_pairs(rows),
                "severity": severity_confusion(vectors, studies, queries, labels, cfg.k)}
    return out


def _heads(bags: dict, store, labels: dict, phenotypes: list[str], labels_path, cfg: EvalConfig,
           result: Evaluation) -> dict:
    """LVEF and disease heads for every model, fraction and seed; statistics on the full-label
    fits. Returns the disease heads' full-label fits by model (the zero-shot section's reference)."""
    from cmr_search.evals.efficiency import head_tasks, label_efficiency
    from cmr_search.evals.plots import efficiency_plot
    from cmr_search.heads.config import HeadConfig
    from cmr_search.metrics.prediction import classification_metrics

    head_cfg = HeadConfig(kind=cfg.head_kind, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction,
                          split_seed=cfg.split_seed)
    main = bags["contrastive"]
    tasks = head_tasks(store, main, "lvef" in labels, phenotypes, labels_path)
    if not tasks:
        result.metrics["heads"] = {"skipped": "no lvef column and no 0/1 phenotype column in the labels"}
        return {}
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a head's ops are tiny: a second thread made each fit 5x slower (measured)
    try:
        for task, label_set in tasks.items():
            runs[task] = label_efficiency(bags, label_set, replace(head_cfg, task=label_set.task), cfg.fractions,
                                          cfg.seeds)
    finally:
        torch.set_num_threads(threads)
    full = {task: {h.model: h for h in held if h.fraction == max(cfg.fractions) and h.seed == 0}
            for task, held in runs.items()}
    out: dict = {"config": head_cfg.to_dict(), "efficiency": []}
    for task, held in runs.items():
        for h in held:
            row = {"task": task, "model": h.model, "fraction": h.fraction, "seed": h.seed,
                   "train_studies": h.train_studies}
            if task == "lvef":
                known = ~np.isnan(h.y[:, 0])
                row["mae"] = float(np.abs(h.pred[known, 0] - h.y[known, 0]).mean())
            else:
                aucs = [classification_metrics(h.y[~np.isnan(h.y[:, j]), j], h.pred[~np.isnan(h.y[:, j]), j])["auroc"]
                        for j in range(len(h.labels))]
                row["mean_auroc"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
            out["efficiency"].append(row)
    if "lvef" in full:
        out["lvef"] = _lvef_statistics(full["lvef"], cfg, result)
        result.figures["efficiency_lvef"] = efficiency_plot(
            [r for r in out["efficiency"] if r["task"] == "lvef"], "mae", "LVEF MAE (points, held out)",
            "LVEF head: error against share of labels")
    if "disease" in full:
        out["disease"] = _disease_statistics(full["disease"], tasks["disease"].names, cfg)
        result.figures["efficiency_disease"] = efficiency_plot(
            [r for r in out["efficiency"] if r["task"] == "disease"], "mean_auroc", "mean AUROC over labels (held out)",
            "Disease head: AUROC against share of labels")
    result.metrics["heads"] = out
    return full.get("disease", {})


def _lvef_statistics(held: dict, cfg: EvalConfig, result: Evaluation) -> dict:
    """Per model: LVEF errors, Bland-Altman, HFrEF AUROC (plots into ``result``); the paired test."""
    from sklearn.metrics import roc_curve

    from cmr_search.evals.plots import bland_altman_plot, roc_plot
    from cmr_search.metrics.prediction import regression_metrics
    from cmr_search.metrics.stats import auroc_ci

    lvef = {}
    curves = {}
    for name, h in held.items():
        known = ~np.isnan(h.y[:, 0])
        y, pred = h.y[known, 0], h.pred[known, 0]
        lvef[name] = regression_metrics(y, pred) | {"abs_error_sd": float(np.abs(pred - y).std(ddof=1))}
        hfref = (y < cfg.hfref_below).astype(int)
        if 0 < hfref.sum() < len(hfref):
            auc, lo, hi = auroc_ci(hfref, -pred, cfg.level)
            lvef[name]["hfref"] = {"auroc": auc, "lower": lo, "upper": hi, "positives": int(hfref.sum()),
                                   "n": len(hfref)}
            fpr, tpr, _ = roc_curve(hfref, -pred)
            curves[name] = (fpr, tpr, auc)
        m = lvef[name]
        result.figures[f"bland_altman_{name}"] = bland_altman_plot(
            y, pred, m["bias"], m["loa_low"], m["loa_high"], f"LVEF, {name} ({len(y)} held-out studies)")
    if curves:
        result.figures["hfref_roc"] = roc_plot(curves, f"HFrEF (LVEF < {cfg.hfref_below:g} %) from predicted LVEF")
    if len(held) == 2 and "hfref" in lvef.get("baseline", {}):
        a, b = held["contrastive"], held["baseline"]
        known = ~np.isnan(a.y[:, 0])
        lvef["hfref_delong_p"] = _paired_p((a.y[known, 0] < cfg.hfref_below).astype(int), -a.pred[known, 0],
                                           -b.pred[known, 0])
    return lvef


def _disease_statistics(held: dict, names: list[str], cfg: EvalConfig) -> list[dict]:
    """Per label: each model's AUROC with its DeLong interval, and the paired DeLong p-value."""
    from cmr_search.metrics.stats import auroc_ci

    rows = []
    for j, label in enumerate(names):
        row = {"label": label}
        for name, h in held.items():
            known = ~np.isnan(h.y[:, j])
            y = h.y[known, j].astype(int)
            row[f"{name}_n"], row[f"{name}_positives"] = int(known.sum()), int(y.sum())
            if 0 < y.sum() < len(y):
                auc, lo, hi = auroc_ci(y, h.pred[known, j], cfg.level)
                row |= {f"{name}_auroc": auc, f"{name}_lower": lo, f"{name}_upper": hi}
        if len(held) == 2 and "baseline_auroc" in row and "contrastive_auroc" in row:
            a, b = held["contrastive"], held["baseline"]
            known = ~np.isnan(a.y[:, j])
            row["p_delong"] = _paired_p(a.y[known, j].astype(int), a.pred[known, j], b.pred[known, j])
        rows.append(row)
    return rows


def _paired_p(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The paired DeLong p-value, NaN where the held-out studies hold under 2 cases or controls."""
    from cmr_search.metrics.stats import delong_test

    return delong_test(y, a, b) if 2 <= y.sum() <= len(y) - 2 else float("nan")


def _registered_heads(store_root: Path) -> list[dict]:
    from cmr_search.heads.registry import HeadRegistry

    out = []
    for card in HeadRegistry(Path(store_root)).cards():
        test = card.get("metrics", {}).get("test", {})
        out.append({"name": card.get("name"), "kind": card.get("config", {}).get("kind"), "task": card.get("task"),
                    "labels": card.get("labels"), "model_id": card.get("model_id"), "test": test,
                    "test_studies": card.get("split", {}).get("test_studies")})
    return out


def _clusters(store, models: dict, bags: dict, labels: dict, phenotypes: list[str], cfg: EvalConfig,
              result: Evaluation) -> None:
    from cmr_search.evals.plots import map_plot
    from cmr_search.metrics.clusters import (
        cluster_agreement,
        cluster_embeddings,
        embedding_map,
        main_phenotype,
        neighbour_agreement,
    )

    classes = main_phenotype(labels, phenotypes) if phenotypes else np.full(len(bags["contrastive"]), "none", object)
    out = {}
    for name, b in bags.items():
        vectors = b.studies.numpy()
        clusters = cluster_embeddings(vectors, min_cluster_size=cfg.min_cluster_size)
        views = store.view_rows(models[name], ["view", "study_uid", "vector"])
        view_vectors = store.vectors(views)
        view_names = np.array(views["view"].to_pylist(), dtype=object)
        out[name] = {"hdbscan": {"sizes": {str(c): s for c, s in clusters.sizes.items()},
                                 **cluster_agreement(clusters.labels, classes)},
                     "per_label": {p: cluster_agreement(clusters.labels, labels[p].astype(str)) for p in phenotypes},
                     "view_neighbours": neighbour_agreement(view_vectors, view_names, cfg.k),
                     "study_neighbours_same_phenotype": neighbour_agreement(vectors, classes, cfg.k)}
        if name != "contrastive":
            continue
        xy = embedding_map(vectors, cfg.map_method, cfg.split_seed)
        panels = {"main phenotype": classes}
        if "lvef" in labels:
            panels["LVEF (%)"] = labels["lvef"]
        sex = _column(store, models[name], "sex", b.study_uids)
        if sex is not None:
            panels["sex"] = sex
        panels["HDBSCAN cluster"] = clusters.labels.astype(str)
        for p in phenotypes[:5]:
            panels[p] = np.where(np.isnan(labels[p]), "unknown", labels[p].astype(int).astype(str))
        result.figures["map_studies"] = map_plot(xy, panels, f"study embeddings ({cfg.map_method})")
        view_xy = embedding_map(view_vectors, cfg.map_method, cfg.split_seed)
        result.figures["map_views"] = map_plot(view_xy, {"view": view_names}, f"view embeddings ({cfg.map_method})")
    result.metrics["clusters"] = out


def _column(store, model_id: str, name: str, study_uids: list[str]):
    """A text column of the model's studies rows (sex) aligned with ``study_uids``, or None."""
    rows = store.study_rows(model_id, ["study_uid", name])
    if name not in rows.column_names:
        return None
    value = dict(zip(rows["study_uid"].to_pylist(), rows[name].to_pylist()))
    return np.array([value.get(u) or "unknown" for u in study_uids], dtype=object)
