"""What every command-line module shares: the stderr console, the --store option, failing
with a clear message and exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cmr.exceptions import CmrError
from cmr.settings import Settings

__all__ = ["StoreOpt", "err", "fail", "store_dir"]

err = Console(stderr=True, soft_wrap=True)  # soft wrap: messages stay greppable

StoreOpt = Annotated[Path | None, typer.Option("--store", help="Store directory (default: $CMR_STORE).")]


def store_dir(store: Path | None, settings: Settings) -> Path:
    """The --store option, else CMR_STORE; exit 2 when neither is given."""
    path = store or settings.store
    if path is None:
        err.print("[red]error:[/] no store given; pass --store DIR or set CMR_STORE")
        raise typer.Exit(2)
    return path


def fail(error: CmrError) -> None:
    """Print a domain error and exit with the usage-error code."""
    err.print(f"[red]error:[/] {error}")
    raise typer.Exit(2)
