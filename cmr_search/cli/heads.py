"""``cmr heads train|list|predict|evaluate|export|import|zero-shot``: heads on the stored
embeddings, their registry (portable between stores as one file), and zero-shot labels from
a prompt pair."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cmr_search.cli.common import StoreOpt, err, fail, store_dir
from cmr_search.core.exceptions import CmrError, InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.core.settings import Settings
from cmr_search.heads.config import HeadConfig

heads_app = typer.Typer(help="Heads trained on the stored embeddings: LVEF, disease labels.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
HeadOpt = Annotated[str, typer.Option("--head", help="A registered head's name (`cmr heads list`).")]


def _fmt(metrics: dict) -> str:
    """One line per label: the figures a clinician reads first."""
    parts = []
    for label, m in metrics.items():
        if "mae" in m:
            parts.append(f"{label}: MAE {m['mae']:.2f}, RMSE {m['rmse']:.2f}, bias {m['bias']:+.2f} "
                         f"(LoA {m['loa_low']:.1f} to {m['loa_high']:.1f}), n {m['n']}")
        elif m.get("auroc") is not None:
            parts.append(f"{label}: AUROC {m['auroc']:.3f}, AUPRC {m['auprc']:.3f}, sens {m['sensitivity']:.2f} / "
                         f"spec {m['specificity']:.2f}, {m['positives']}/{m['n']} positive")
        else:
            parts.append(f"{label}: one class only in this split ({m.get('positives')}/{m.get('n')} positive)")
    return "\n".join(parts)


@heads_app.command()
def train(
    label: Annotated[list[str], typer.Option("--label", help="Label column (repeat for a multi-label head).")],
    store: StoreOpt = None,
    kind: Annotated[str, typer.Option("--kind", help="mil (attention over the views) or linear (study embedding).")] = "mil",
    task: Annotated[str, typer.Option("--task", help="auto, regression, binary or multilabel.")] = "auto",
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV/Parquet keyed by study_uid (default: the store's label table).")] = None,
    fraction: Annotated[float, typer.Option("--fraction", min=0.0, max=1.0, help="Share of the training split to train on (1%: 0.01).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Initialisation, batch order and the --fraction sample.")] = 0,
    split_seed: Annotated[int, typer.Option("--split-seed", help="The patient-level train/validation/test split.")] = 0,
    hidden: Annotated[int, typer.Option("--hidden", min=1, help="Attention hidden size (mil).")] = HeadConfig.hidden,
    dropout: Annotated[float, typer.Option("--dropout", min=0.0, max=0.9)] = HeadConfig.dropout,
    max_epochs: Annotated[int, typer.Option("--max-epochs", min=1)] = HeadConfig.max_epochs,
    patience: Annotated[int, typer.Option("--patience", min=1, help="Validations without a better loss before stopping.")] = HeadConfig.patience,
    model_id: Annotated[str | None, typer.Option("--model-id", help="Embeddings of this encoder (default: the store's default model).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Registry name (default: LABEL-KIND-MODEL).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a head of the same name.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a head on the stored embeddings and register it (weights + card with metrics)."""
    from cmr_search.heads import train_head

    root = store_dir(store, Settings())
    try:
        cfg = HeadConfig(kind=kind, task=task, hidden=hidden, dropout=dropout, max_epochs=max_epochs,
                         patience=patience, fraction=fraction, seed=seed, split_seed=split_seed)
        head, label_set = train_head(root, label, cfg, labels, model_id, name, replace)
    except CmrError as error:
        fail(error)
    card = head.card
    if as_json:
        print(json.dumps(card))
        return
    for problem in label_set.problems:
        err.print(f"  [yellow]note[/] {problem}")
    s = card["split"]
    err.print(f"head [bold]{head.name}[/]: {card['task']} {card['kind']} on model {card['model_id']}, "
              f"{s['train_studies']} train / {s['val_studies']} val / {s['test_studies']} test studies, "
              f"{card['epochs']} epochs (best {card['best_epoch']}) in {card['training_seconds']:.1f} s")
    err.print("test: " + _fmt(card["metrics"]["test"]))


@heads_app.command("list")
def list_heads(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """The store's registered heads with their test metrics."""
    from cmr_search.heads import HeadRegistry

    cards = HeadRegistry(store_dir(store, Settings())).cards()
    if as_json:
        print(json.dumps([{k: c[k] for k in ("name", "task", "labels", "kind", "model_id", "metrics", "split",
                                             "training_seconds", "created_at")} for c in cards]))
        return
    table = Table(title=f"{len(cards)} heads")
    for col in ("name", "task", "kind", "model", "train", "test", "created"):
        table.add_column(col)
    for c in cards:
        table.add_row(c["name"], c["task"], c["kind"], c["model_id"], str(c["split"]["train_studies"]),
                      _fmt(c["metrics"]["test"]), c["created_at"])
    err.print(table)


@heads_app.command()
def predict(
    head: HeadOpt,
    study: Annotated[list[str], typer.Option("--study", help="study_uid (repeatable).")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict for stored studies: value or probability, and the attention on each view."""
    from cmr_search.heads import predict_head

    root = store_dir(store, Settings())
    try:
        rows = predict_head(root, head, study)
    except CmrError as error:
        fail(error)
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        values = ", ".join(f"{k} {v:.3g}" + (" (positive)" if row.get("positive", {}).get(k) else "")
                           for k, v in row["prediction"].items())
        err.print(f"{row['study_uid']}: {values}")
        for a in sorted(row.get("attention", []), key=lambda a: -a["weight"]):
            where = a["view"] + ("" if a["slice_index"] is None else f" slice {a['slice_index']}")
            err.print(f"    {a['weight']:.3f}  {where}")


@heads_app.command()
def evaluate(
    head: HeadOpt,
    store: StoreOpt = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="Score every labelled study of this file instead of the head's test split.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Metrics of a head on its own test split, or on an external label file."""
    from cmr_search.heads import evaluate_head

    try:
        result = evaluate_head(store_dir(store, Settings()), head, labels)
    except CmrError as error:
        fail(error)
    if as_json:
        print(json.dumps(result))
        return
    for problem in result["label_problems"]:
        err.print(f"  [yellow]note[/] {problem}")
    err.print(f"{head} on {result['scope']} ({result['studies']} studies):\n" + _fmt(result["metrics"]))


@heads_app.command("export")
def export_head(
    name: Annotated[str, typer.Argument(help="A registered head's name (`cmr heads list`).")],
    out: Annotated[Path, typer.Option("--out", help="The head file to write (a folder: NAME.head.safetensors in it).")],
    store: StoreOpt = None,
) -> None:
    """Write a head (weights and card, with its encoder's model_id) to one file for another store."""
    from cmr_search.heads import HeadRegistry

    try:
        registry = HeadRegistry(store_dir(store, Settings()))
        path = registry.export(name, out)
        model_id = registry.card(name)["model_id"]
    except CmrError as error:
        fail(error)
    err.print(f"head {name} written to {path}; it runs on embeddings of model {model_id} "
              f"(embed the other store with that encoder, then `cmr heads import {path.name} --store OTHER`)")


@heads_app.command("import")
def import_head(
    path: Annotated[Path, typer.Argument(help="A head file written by `cmr heads export`.")],
    store: StoreOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Register it under this name (default: its own).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite a head of the same name.")] = False,
) -> None:
    """Register a head exported from another store; it predicts once this store holds
    embeddings of the head's encoder."""
    from cmr_search.heads import HeadRegistry
    from cmr_search.store.embedding_store import EmbeddingStore

    root = store_dir(store, Settings())
    try:
        registry = HeadRegistry(root)
        name = registry.import_file(path, name, replace)
        model_id = registry.card(name)["model_id"]
        tables = EmbeddingStore.open(root) if StoreLayout(root).may_hold_tables() else None
        have = tables.model_ids("studies") if tables is not None else {}
        vectors = tables.vectors_of(model_id) if tables is not None else model_id  # a text-aligned model's video model
    except CmrError as error:
        fail(error)
    err.print(f"head {name} imported (model {model_id})")
    if vectors not in have:
        err.print(f"  [yellow]note[/] this store holds no embeddings of model {model_id} yet; embed it with that "
                  f"encoder before predicting: `cmr embed --store {root} --checkpoint <its folder>/encoders/{model_id}`")


@heads_app.command("zero-shot")
def zero_shot(
    label: Annotated[str, typer.Option("--label", help="The finding to score (its default prompts) and the 0/1 column of --labels.")],
    store: StoreOpt = None,
    positive: Annotated[str | None, typer.Option("--positive", help="Prompt stating the finding (default: the lexicon's, e.g. 'apical LV thrombus').")] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="Prompt denying it (default: the lexicon's, e.g. 'no LV thrombus').")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV/Parquet keyed by study_uid: the AUROC of the score with its DeLong 95% interval.")] = None,
    model_id: Annotated[str | None, typer.Option("--model-id", help="Embeddings and text tower of this encoder (default: the store's default model).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the scores (study_uid,score[,label]) as CSV here instead of stdout.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score every study by cos(study, positive) - cos(study, negative) with the encoder's text
    tower (no head, no training); with --labels also the AUROC [DeLong CI]."""
    from cmr_search.heads import zero_shot as score_zero_shot

    root = store_dir(store, Settings())
    try:
        result = score_zero_shot(root, label, positive, negative, labels, model_id)
        if out is not None:
            try:
                with open(out, "w", newline="") as fp:
                    result.write_csv(fp)
            except OSError as error:
                raise InputError(f"cannot write the scores to {out}: {error.strerror}; choose another --out") from None
    except CmrError as error:
        fail(error)
    summary = result.summary()
    if as_json:
        print(json.dumps(summary | ({"out": str(out)} if out is not None else {"scores": result.rows()})))
        return
    if out is None:
        result.write_csv(sys.stdout)
    for problem in result.problems:
        err.print(f"  [yellow]note[/] {problem}")
    err.print(f"zero-shot {label} on model {result.model_id}: {summary['studies']} studies scored by "
              f"'{result.positive}' against '{result.negative}'" + (f", written to {out}" if out is not None else ""))
    if result.auroc is not None:
        a = result.auroc
        ci = (f"{a['level']:.0%} CI {a['lower']:.3f}-{a['upper']:.3f}" if summary["lower"] is not None
              else "no CI from a single case or control")
        auc = "AUROC n/a (one class only)" if summary["auroc"] is None else f"AUROC {a['auroc']:.3f} [{ci}, DeLong]"
        err.print(f"{auc}, {a['positives']} positives / {a['negatives']} negatives"
                  + (f"; {a['unlabelled']} studies without a label left out" if a["unlabelled"] else ""))
