"""``cmr encoders list|show|set-default``: the models a store holds, where each came from,
whether it has a text tower, and which one is the store's default; ``cmr train-text``: a
text tower aligned to a model's stored embeddings."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cmr_search.cli.common import StoreOpt, err, fail, store_dir
from cmr_search.core.exceptions import CmrError
from cmr_search.core.layout import StoreLayout
from cmr_search.core.settings import Settings

encoders_app = typer.Typer(help="The encoders a store holds and its default model.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _rows(root) -> list[dict]:
    from cmr_search.encoder.registry import EncoderRegistry
    from cmr_search.store.embedding_store import EmbeddingStore

    registry = EncoderRegistry(root)
    studies = EmbeddingStore.open(root).model_ids("studies") if StoreLayout(root).may_hold_tables() else {}
    rows = []
    for model_id in dict.fromkeys([*registry.model_ids(), *studies]):
        try:
            card = registry.card(model_id)
        except CmrError:  # embeddings of a model whose weights this store never kept
            card = {"model_id": model_id, "origin": "unregistered", "source": "", "config": "?", "text_tower": False}
        rows.append({"video_model": None} | card | {"default": model_id == registry.default,
                                                   "studies": studies.get(registry.layout.vectors_model_id(model_id), 0)})
    return rows


@encoders_app.command("list")
def list_encoders(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Every model of the store: origin, config, text tower, embedded studies, the default."""
    root = store_dir(store, Settings())
    try:
        rows = _rows(root)
    except CmrError as error:
        fail(error)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"{len(rows)} encoders")
    for col in ("model_id", "default", "origin", "from", "config", "text tower", "video model", "studies"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model_id"], "*" if r["default"] else "", r["origin"], r.get("source") or "",
                      r.get("config") or "", "yes" if r["text_tower"] else "no", r["video_model"] or "its own",
                      str(r["studies"]))
    err.print(table)


@encoders_app.command()
def show(model_id: Annotated[str, typer.Argument(help="A model_id (`cmr encoders list`).")],
         store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """One model's card and full configuration."""
    from cmr_search.encoder.registry import EncoderRegistry

    root = store_dir(store, Settings())
    try:
        registry = EncoderRegistry(root)
        out = {"card": registry.card(model_id), "default": registry.default == model_id,
               "config": registry.config(model_id).to_dict()}
    except CmrError as error:
        fail(error)
    if as_json:
        print(json.dumps(out))
    else:
        err.print_json(json.dumps(out))


@encoders_app.command("set-default")
def set_default(model_id: Annotated[str, typer.Argument(help="A registered model_id (`cmr encoders list`).")],
                store: StoreOpt = None) -> None:
    """Make a model the store's default for search, heads, the service and the evaluation."""
    from cmr_search.encoder.registry import EncoderRegistry
    from cmr_search.store.embedding_store import EmbeddingStore

    root = store_dir(store, Settings())
    try:
        EncoderRegistry(root).set_default(model_id)
        tables = EmbeddingStore.open(root)
        studies = tables.model_ids("studies").get(tables.vectors_of(model_id), 0)
    except CmrError as error:
        fail(error)
    hint = "" if studies else f"; it has no embeddings yet: run `cmr embed --store {root} --checkpoint {root}/encoders/{model_id}`"
    err.print(f"default model: {model_id} ({studies} studies embedded){hint}")


def train_text(
    store: StoreOpt = None,
    model_id: Annotated[str | None, typer.Option("--model-id", help="The model whose stored embeddings to align to (default: the store's default model).")] = None,
    text_model: Annotated[str | None, typer.Option("--text-model", help="A local Hugging Face BERT-family folder (default: the packaged all-MiniLM-L6-v2).")] = None,
    config: Annotated[str, typer.Option("--config", help="Named recipe (encoder/configs/text/*.json) or a JSON path.")] = "minilm_cpu",
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop at this step (default: the recipe's).")] = None,
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", min=0.1, help="Stop after this long (a checkpoint is written).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last checkpoint.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the recipe's seed.")] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="Run folder under STORE/encoders/runs.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda (default: cuda if present).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Align a text tower to a model's stored embeddings (minutes; no clip is read).

    Its video tower stays locked: text search, zero-shot labels and the evaluation for a
    model without a text tower (the published checkpoint), or a text side in this site's
    words.

    The result is a model of its own (STORE/encoders/<model_id>) that searches the video
    model's stored vectors; it becomes the default where the video model was.
    """
    from dataclasses import replace

    from cmr_search.encoder.config import load_text_align_config
    from cmr_search.encoder.train_text import TextTrainer

    root = store_dir(store, Settings())
    try:
        cfg = load_text_align_config(config)
        if text_model is not None:  # another model's weights: the packaged file's hash no longer applies
            cfg.text = replace(cfg.text, model=text_model, sha256=None)
        if seed is not None:
            cfg = replace(cfg, seed=seed)
        run_dir = StoreLayout(root).run(run_name) if run_name else None
        trainer = TextTrainer(root, cfg, model_id, run_dir=run_dir, resume=resume, log=err.print, device=device)
        result = trainer.fit(max_steps=max_steps, max_minutes=max_minutes)
    except CmrError as error:
        fail(error)
    summary = {"model_id": result.model_id, "video_model": trainer.video_model, "checkpoint": str(result.checkpoint),
               "step": result.step, "seconds": round(result.seconds, 1), "val": result.val}
    if as_json:
        print(json.dumps(summary))
    else:
        err.print(f"validation text->study retrieval: {result.val}")
