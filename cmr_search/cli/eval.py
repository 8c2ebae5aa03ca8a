"""``cmr eval``: how good a store's embeddings are, as report.html + metrics.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from cmr_search.cli.common import StoreOpt, err, fail, store_dir
from cmr_search.core.exceptions import CmrError, InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.core.settings import Settings
from cmr_search.evals.config import EvalConfig
from cmr_search.store.config import IndexConfig


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated shares such as 0.01,0.1,1; got {text!r}") from None


def eval_command(
    store: StoreOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for report.html and metrics.json (default: STORE/eval).")] = None,
    model_id: Annotated[str | None, typer.Option("--model-id", help="Embeddings of this encoder (default: the store's default model).")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV/Parquet keyed by study_uid (default: the store's label table).")] = None,
    baseline: Annotated[str, typer.Option("--baseline", help="random: compare with the same encoder at random init (embedded into the store once); none: skip.")] = EvalConfig.baseline,
    fractions: Annotated[str, typer.Option("--fractions", help="Shares of the training labels for the data-efficiency curves.")] = "0.01,0.1,1",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Replicates per share.")] = EvalConfig.seeds,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Results scored per query.")] = EvalConfig.k,
    map_method: Annotated[str, typer.Option("--map", help="2-D map: tsne (openTSNE) or pca.")] = EvalConfig.map_method,
    external: Annotated[list[Path] | None, typer.Option("--external", help="Another site's store (repeatable): heads fitted here, scored there (the paper's internal-vs-external table).")] = None,
    reference: Annotated[Path | None, typer.Option("--reference", help="The seed paper's prediction folder (cmr_transformer layout): reproduce its statistics too.")] = None,
    predictions: Annotated[Path | None, typer.Option("--predictions", help="Instead of a store: a prediction file (W&B table JSON or CSV of study id, score, label).")] = None,
    baseline_predictions: Annotated[Path | None, typer.Option("--baseline-predictions", help="With --predictions: a second model's file for the paired DeLong test.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json on stdout too.")] = False,
) -> None:
    """Evaluate the embeddings: retrieval, LVEF, disease AUROC, zero-shot, data efficiency, clusters.

    Text-to-scan and scan-to-scan retrieval, LVEF and disease heads with DeLong intervals
    (contrastive vs the same encoder at random init), zero-shot labels from prompt pairs beside
    the disease head, label efficiency over seeds, HDBSCAN clusters and a 2-D map.

    Writes a self-contained report.html (tables and plots) and metrics.json. With
    --predictions (and no store) it scores a prediction file as the paper's tables do.
    """
    from cmr_search.evals.report import write_report

    started = time.perf_counter()
    settings = Settings()
    root = store_dir(store, settings) if store is not None else settings.store
    try:
        if predictions is not None:
            from cmr_search.evals.reference import evaluate_prediction_files

            metrics = {"predictions": evaluate_prediction_files(predictions, baseline_predictions)}
            figures = {}
        elif root is None and reference is None:
            raise InputError("give --store DIR (or set CMR_STORE), --predictions FILE or --reference DIR")
        else:
            metrics, figures = {}, {}
        if root is not None and predictions is None:
            from cmr_search.evals.evaluate import evaluate_store

            cfg = EvalConfig(k=k, fractions=_fractions(fractions), seeds=seeds, baseline=baseline, map_method=map_method)
            result = evaluate_store(Path(root), cfg, model_id, labels, IndexConfig.from_settings(settings), log=err.print,
                                    externals=external)
            metrics, figures = result.metrics, result.figures
        if reference is not None:
            from cmr_search.evals.reference import reproduce_paper

            metrics["reference"] = reproduce_paper(reference)
    except CmrError as error:
        fail(error)
    out = out or (StoreLayout(root).eval if root is not None and predictions is None else Path("eval"))
    metrics_path, report_path = write_report(out, metrics, figures)
    err.print(f"report: {report_path}\nmetrics: {metrics_path}\n({time.perf_counter() - started:.0f} s)")
    if as_json:
        print(metrics_path.read_text())
    else:
        _headline(metrics)


def _headline(metrics: dict) -> None:
    """The few numbers a user reads first."""
    t = metrics.get("text_retrieval", {}).get("own_report")
    if t:
        err.print(f"own report -> study: R@1 {t.get('R@1', float('nan')):.3f}, R@10 {t.get('R@10', float('nan')):.3f}, "
                  f"median rank {t.get('median_rank')} of {t.get('pool')}")
    lvef = metrics.get("heads", {}).get("lvef", {})
    for name in ("contrastive", "baseline"):
        if name in lvef:
            m = lvef[name]
            err.print(f"LVEF {name}: MAE {m['mae']:.2f} (LoA {m['loa_low']:.1f} to {m['loa_high']:.1f})"
                      + (f", HFrEF AUROC {m['hfref']['auroc']:.3f}" if "hfref" in m else ""))
    for name, site in metrics.get("external", {}).get("sites", {}).items():
        lv, r, g = site.get("lvef", {}), site.get("retrieval", {}), site.get("gap", {})
        parts = [f"LVEF MAE {lv['mae']:.2f}" if "mae" in lv else "",
                 f"mean disease AUROC {site['mean_auroc']:.3f}" if site.get("mean_auroc") is not None else "",
                 f"own-report R@10 {r['common_R@10']:.3f} (pools of {r['common_pool']})" if r else "",
                 f"MAE ratio {g['lvef_mae_ratio']:.2f}" if "lvef_mae_ratio" in g else ""]
        err.print(f"{'internal test' if name == 'internal' else 'external ' + name}: " + ", ".join(p for p in parts if p))
    if "predictions" in metrics:
        err.print(json.dumps(metrics["predictions"], default=str)[:2000])
