"""``cmr encoders list|show|set-default``: the models a store holds, where each came from,
whether it has a text tower, and which one is the store's default."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cmr_search.cli.common import StoreOpt, err, fail, store_dir
from cmr_search.core.exceptions import CmrError
from cmr_search.core.settings import Settings

encoders_app = typer.Typer(help="The encoders a store holds and its default model.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _rows(root) -> list[dict]:
    from cmr_search.encoder.registry import EncoderRegistry
    from cmr_search.store.embedding_store import EmbeddingStore

    registry = EncoderRegistry(root)
    studies = EmbeddingStore.open(root).model_ids("studies") if (root / "lance").exists() else {}
    rows = []
    for model_id in dict.fromkeys([*registry.model_ids(), *studies]):
        try:
            card = registry.card(model_id)
        except CmrError:  # embeddings of a model whose weights this store never kept
            card = {"model_id": model_id, "origin": "unregistered", "source": "", "config": "?", "text_tower": False}
        rows.append(card | {"studies": studies.get(model_id, 0), "default": model_id == registry.default})
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
    for col in ("model_id", "default", "origin", "from", "config", "text tower", "studies"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model_id"], "*" if r["default"] else "", r["origin"], r.get("source") or "",
                      r.get("config") or "", "yes" if r["text_tower"] else "no", str(r["studies"]))
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
        studies = EmbeddingStore.open(root).model_ids("studies").get(model_id, 0)
    except CmrError as error:
        fail(error)
    hint = "" if studies else f"; it has no embeddings yet: run `cmr embed --store {root} --checkpoint {root}/encoders/{model_id}`"
    err.print(f"default model: {model_id} ({studies} studies embedded){hint}")
