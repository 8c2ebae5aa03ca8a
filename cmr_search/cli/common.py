"""What every command-line module shares: the stderr console, the --store option, failing
with a clear message and exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cmr_search.core.exceptions import CmrError
from cmr_search.core.settings import Settings

__all__ = ["StoreOpt", "err", "fail", "print_ingest", "run_ingest", "store_dir"]

err = Console(stderr=True, soft_wrap=True)  # soft wrap: messages stay greppable

StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="Store directory, or s3://BUCKET/PREFIX for tables on object storage (state in $CMR_STATE_DIR) "
                    "(default: $CMR_STORE).")]


def store_dir(store: str | Path | None, settings: Settings) -> Path:
    """The --store option, else CMR_STORE, as the store's local root (an object-storage URI's
    state folder); exit 2 when neither is given or the URI cannot be used."""
    from cmr_search.core.location import store_root
    from cmr_search.store.object_store import join

    if store is None and settings.store is None:
        err.print("[red]error:[/] no store given; pass --store DIR or set CMR_STORE")
        raise typer.Exit(2)
    try:  # a state folder new to a store on object storage joins it (copies its store.json)
        return join(settings.store if store is None else store_root(store, settings.state_dir))
    except CmrError as error:
        fail(error)


def fail(error: CmrError) -> None:
    """Print a domain error and exit with the usage-error code."""
    err.print(f"[red]error:[/] {error}")
    raise typer.Exit(2)


def run_ingest(paths, root, cfg, settings: Settings, reports=None, labels=None):
    """Ingest into the store at ``root`` (created if new); a domain error exits with code 2."""
    from cmr_search.ingest.pipeline import ingest_into

    try:
        return ingest_into(paths, root, cfg, settings.patient_salt, reports=reports, labels=labels)
    except CmrError as error:
        fail(error)


def print_ingest(report) -> None:
    """The ingest report as a table on stderr, with the skips and rejections grouped."""
    table = Table(title="ingest", show_header=False)
    if report.studies_listed is not None:  # a DICOMweb pull
        table.add_row("studies listed", str(report.studies_listed))
    for key in ("files_found", "files_read", "studies_found", "studies_written", "clips_inserted", "clips_updated", "clips_unchanged", "reports_imported", "labels_imported", "seconds"):
        table.add_row(key.replace("_", " "), str(getattr(report, key)))
    table.add_row("views", ", ".join(f"{v} {n}" for v, n in sorted(report.views.items())))
    table.add_row("skipped (by design)", str(len(report.skipped)))
    table.add_row("rejected", str(len(report.rejected)))
    err.print(table)
    reasons: dict[str, int] = {}
    for item in report.skipped:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        err.print(f"  skipped {n:>5}  {reason}")
    for item in report.rejected[:50]:
        err.print(f"  [red]rejected[/] {item['where']}: {item['reason']}")
    if len(report.rejected) > 50:
        err.print(f"  ... {len(report.rejected) - 50} more rejections (see --json)")
    cols = report.label_columns
    if cols:
        err.print(f"  labels: {len(cols['numeric'])} numeric columns kept as labels ({', '.join(cols['numeric']) or 'none'})")
        if cols["text"]:
            err.print(f"  [yellow]labels[/]: {', '.join(cols['text'])} kept as text, not usable as labels "
                      "(code them as numbers, 0/1 for a finding, to train or evaluate on them)")
    for warning in report.warnings[:20]:
        err.print(f"  [yellow]warning[/] {warning}")
