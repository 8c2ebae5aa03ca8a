"""External validation, the seed paper's internal-vs-external table: heads fitted on one
store's training split, scored on its own held-out test split (internal) and on every
labelled study of other stores (external sites), with the same encoder.

An external store is embedded with the internal store's encoder first where it is not yet
(``embed_store`` registers the encoder there; the store's own default model is left alone).
Text-to-scan retrieval (each study's own report as the query) is scored at every site on
pools of one common size as well, since R@10 in a pool of 40 and in a pool of 400 are not
the same test.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from cmr_search.core.exceptions import InputError
from cmr_search.evals.config import EvalConfig

__all__ = ["external_validation", "site_name"]

#: random pools per site for the common-pool retrieval figure
POOL_DRAWS = 20


def site_name(root: Path) -> str:
    """A site's name in the table: the store folder's name (its parent's where that is "store")."""
    root = Path(root).resolve()
    return root.parent.name if root.name == "store" else root.name


def external_validation(internal_root: Path, externals: list[Path], model_id: str, cfg: EvalConfig,
                        text_encoder, index_config=None, log=print) -> dict:
    """The internal-vs-external table as a dict: per site LVEF (MAE, SD of the absolute error,
    Bland-Altman, HFrEF AUROC with its DeLong interval), per-label AUROCs, own-report
    retrieval, and the gaps (external / internal MAE, AUROC and R@10 differences)."""
    from cmr_search.evals.efficiency import aligned_columns, head_tasks, phenotype_columns
    from cmr_search.heads.config import HeadConfig
    from cmr_search.heads.data import label_table, load_bags, patient_split
    from cmr_search.heads.train import fit_head
    from cmr_search.store.embedding_store import EmbeddingStore

    internal = EmbeddingStore.open(Path(internal_root))
    bags = load_bags(internal, model_id)
    table, _, _ = label_table(internal, None)
    values = aligned_columns(table, bags.study_uids)
    phenotypes = phenotype_columns(table)
    sites = {}
    for root in externals:
        if Path(root).resolve() == Path(internal_root).resolve():
            raise InputError(f"--external {root} is the evaluated store itself; name another site's store")
        sites[site_name(root)] = _external_store(Path(root), model_id, Path(internal_root), index_config, log)
    head_cfg = HeadConfig(kind=cfg.head_kind, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction,
                          split_seed=cfg.split_seed)
    tasks = head_tasks(internal, bags, "lvef" in values, phenotypes)
    if not tasks:
        raise InputError("external validation needs an lvef column or 0/1 phenotype columns in the store's labels")
    fitted, test_rows = {}, {}
    for task, label_set in tasks.items():
        fitted[task] = fit_head(bags, label_set, replace(head_cfg, task=label_set.task))
        test_rows[task] = patient_split(bags, label_set, head_cfg.val_fraction, head_cfg.test_fraction,
                                        head_cfg.split_seed)[2]
    out: dict = {"model_id": model_id, "head": head_cfg.to_dict(), "columns": {}, "sites": {}}
    reports = {"internal": _own_reports(internal, bags, text_encoder, model_id)}
    out["sites"]["internal"] = {"store": site_name(internal_root), "studies": len(bags)}
    for task, rows in test_rows.items():
        out["sites"]["internal"] |= _score(task, fitted[task], bags.subset(rows), tasks[task].values[rows], cfg)
    for name, (store, ext_bags, ext_table) in sites.items():
        ext_values = aligned_columns(ext_table, ext_bags.study_uids)
        only_internal = sorted(set(values) - set(ext_values))
        only_external = sorted(set(ext_values) - set(values))
        out["columns"][name] = {"only_internal": only_internal, "only_external": only_external}
        row: dict = {"store": name, "studies": len(ext_bags)}
        for task, trained in fitted.items():
            names = tasks[task].names
            shared = [n for n in names if n in ext_values]
            if not shared:
                continue
            y = np.stack([ext_values.get(n, np.full(len(ext_bags), np.nan)) for n in names], axis=1)
            row |= _score(task, trained, ext_bags, y, cfg)
        reports[name] = _own_reports(store, ext_bags, text_encoder, model_id)
        out["sites"][name] = row
    _retrieval(out, reports)
    _gaps(out)
    return out


def _external_store(root: Path, model_id: str, internal_root: Path, index_config, log):
    """An external store's bags of ``model_id`` (embedded with it first where needed) and its labels."""
    from cmr_search.core.layout import StoreLayout
    from cmr_search.encoder.embed import embed_store
    from cmr_search.heads.data import label_table, load_bags
    from cmr_search.store.embedding_store import EmbeddingStore

    if not StoreLayout(root).meta.exists():
        raise InputError(f"--external {root} is not a store (no store.json); ingest that site first with "
                         f"`cmr ingest DICOM --store {root}`")
    store = EmbeddingStore.open(root)
    if store.vectors_of(model_id) not in store.model_ids("studies"):
        if log:
            log(f"embedding {site_name(root)} with model {model_id} (registered there; its default model stays)")
        embed_store(root, StoreLayout(internal_root).encoder(model_id), progress=log is not None,
                    index_config=index_config, set_default=False)
        store = EmbeddingStore.open(root)
    bags = load_bags(store, model_id)
    table, _, _ = label_table(store, None)
    return store, bags, table


def _score(task: str, trained, bags, y: np.ndarray, cfg: EvalConfig) -> dict:
    """The figures of one head on these studies: LVEF errors and HFrEF, or per-label AUROCs."""
    from cmr_search.heads.train import predict_outputs, to_label_units
    from cmr_search.metrics.prediction import regression_metrics
    from cmr_search.metrics.stats import auroc_ci

    pred = to_label_units(trained.task, predict_outputs(trained.model, bags)[0], trained.target)
    if task == "lvef":
        known = ~np.isnan(y[:, 0])
        if known.sum() < 2:
            return {}
        t, p = y[known, 0], pred[known, 0]
        m = regression_metrics(t, p) | {"abs_error_sd": float(np.abs(p - t).std(ddof=1))}
        hfref = (t < cfg.hfref_below).astype(int)
        if 0 < hfref.sum() < len(hfref):
            auc, lo, hi = auroc_ci(hfref, -p, cfg.level)
            m["hfref"] = {"auroc": auc, "lower": lo, "upper": hi, "positives": int(hfref.sum()), "n": len(hfref)}
        return {"lvef": m}
    labels = {}
    for j, name in enumerate(trained.labels):
        known = ~np.isnan(y[:, j])
        if not np.isin(y[known, j], (0.0, 1.0)).all():  # a 0/1 label here, a grade or a count there
            labels[name] = {"auroc": None, "n": int(known.sum()), "skipped": "values other than 0 and 1 at this site"}
            continue
        t = y[known, j].astype(int)
        if 0 < t.sum() < len(t):
            auc, lo, hi = auroc_ci(t, pred[known, j], cfg.level)
            labels[name] = {"auroc": auc, "lower": lo, "upper": hi, "positives": int(t.sum()), "n": int(known.sum())}
        elif known.any():
            labels[name] = {"auroc": None, "positives": int(t.sum()), "n": int(known.sum())}
    aucs = [v["auroc"] for v in labels.values() if v["auroc"] is not None]
    return {"disease": labels, "mean_auroc": float(np.mean(aucs)) if aucs else None}


def _own_reports(store, bags, text_encoder, model_id: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(report vectors, study vectors) of the studies that have a report, or None."""
    from cmr_search.evals.evaluate import _reports

    texts = _reports(store, bags.study_uids)
    have = [i for i, r in enumerate(texts) if r]
    if len(have) < 2:
        return None
    return text_encoder.plain(model_id, [texts[i] for i in have]), bags.studies.numpy()[have]


def _retrieval(out: dict, reports: dict) -> None:
    """Own-report R@k per site, on the whole site and on random pools of the smallest site's size."""
    from cmr_search.evals.queries import own_report_retrieval

    sizes = [len(r[0]) for r in reports.values() if r is not None]
    if not sizes:
        return
    common = min(min(sizes), 100)
    rng = np.random.default_rng(0)
    for name, r in reports.items():
        if r is None:
            continue
        text, studies = r
        whole = own_report_retrieval(text, studies)
        draws = [own_report_retrieval(text[idx], studies[idx])
                 for idx in (rng.choice(len(text), common, replace=False) for _ in range(POOL_DRAWS))]
        out["sites"][name]["retrieval"] = {
            "pool": whole["pool"], "R@1": whole["R@1"], "R@10": whole["R@10"],
            "common_pool": common, "common_R@10": float(np.mean([d["R@10"] for d in draws])),
            "common_chance_R@10": min(10, common) / common}


def _gaps(out: dict) -> None:
    """Each external site against the internal test: MAE ratio, AUROC and R@10 differences."""
    internal = out["sites"]["internal"]
    for name, site in out["sites"].items():
        if name == "internal":
            continue
        gap = {}
        if "lvef" in site and "lvef" in internal:
            gap["lvef_mae_ratio"] = site["lvef"]["mae"] / internal["lvef"]["mae"]
        shared = [n for n, v in site.get("disease", {}).items()
                  if v.get("auroc") is not None and internal.get("disease", {}).get(n, {}).get("auroc") is not None]
        if shared:
            gap["mean_auroc_difference"] = float(np.mean([site["disease"][n]["auroc"] - internal["disease"][n]["auroc"]
                                                          for n in shared]))
            gap["auroc_labels"] = shared
        if "retrieval" in site and "retrieval" in internal:
            gap["r10_difference_common_pool"] = site["retrieval"]["common_R@10"] - internal["retrieval"]["common_R@10"]
        site["gap"] = gap
