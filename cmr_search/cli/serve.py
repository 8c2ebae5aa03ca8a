"""``cmr serve`` (the search service under uvicorn) and ``cmr keys`` (its API keys)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr, ValidationError

from cmr_search.cli.common import StoreOpt, err, fail, store_dir
from cmr_search.core.exceptions import CmrError
from cmr_search.core.layout import StoreLayout
from cmr_search.core.settings import Settings

__all__ = ["keys_app", "serve"]

keys_app = typer.Typer(help="API keys of the search service: create, list, revoke.", no_args_is_help=True)


def serve(
    store: StoreOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8000).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="uvicorn worker processes (each loads the index).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A .env-style file of CMR_* settings.")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys (a trusted laptop only).")] = False,
    sync: Annotated[str | None, typer.Option("--sync", help="Keep the store in step with this DICOMweb archive in the background (as `cmr sync`).", rich_help_panel="Sync")] = None,
    sync_every: Annotated[float | None, typer.Option("--sync-every", min=1.0, help="Seconds between sync cycles (default 60).", rich_help_panel="Sync")] = None,
    sync_token_env: Annotated[str | None, typer.Option("--sync-token-env", help="Environment variable holding the archive's bearer token.", rich_help_panel="Sync")] = None,
    sync_user: Annotated[str | None, typer.Option("--sync-user", help="User name for basic auth (Orthanc).", rich_help_panel="Sync")] = None,
    sync_password_env: Annotated[str | None, typer.Option("--sync-password-env", help="Environment variable holding the basic-auth password.", rich_help_panel="Sync")] = None,
) -> None:
    """Serve search, uploads, predictions and the web page over a store (docs at /docs).

    With --sync URL the service also pulls new studies from a DICOMweb archive every
    --sync-every seconds, ingests and embeds them (its state on /readyz and /metrics).
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from cmr_search.api.settings import ServeSettings
    from cmr_search.api.workers import BalancedHttpProtocol, ConnectionShare, WorkerListener

    if config is not None and not config.exists():
        err.print(f"[red]error:[/] --config {config} does not exist")
        raise typer.Exit(2)
    overrides = {k: v for k, v in (("host", host), ("port", port), ("serve_workers", workers), ("sync_url", sync),
                                   ("sync_every_s", sync_every), ("sync_token_env", sync_token_env),
                                   ("sync_user", sync_user), ("sync_password_env", sync_password_env)) if v is not None}
    if no_auth:
        overrides["auth"] = False
    try:
        settings = ServeSettings(_env_file=config, **overrides)
    except ValidationError as error:  # a bad CMR_* value (e.g. a viewer_url template): say which, no traceback
        for problem in error.errors():
            err.print(f"[red]error:[/] setting {'.'.join(map(str, problem['loc']))}: {problem['msg']}")
        raise typer.Exit(2) from None
    root = store_dir(store, settings)
    settings = settings.model_copy(update={"store": root})
    from cmr_search.api.auth import KeyRing

    if settings.auth and not KeyRing(root).list():  # (on object storage the keys are shared objects)
        err.print(f"[yellow]note:[/] no API keys yet; create one with `cmr keys create --store {root} --role read`")
    # every worker process builds its app from the environment: hand the settings down that way
    for name, value in settings.model_dump(exclude_none=True).items():
        # secrets dump as "**********": hand down their values (a --config file may hold them)
        os.environ[f"CMR_{name.upper()}"] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    err.print(f"serving {root} on http://{settings.host}:{settings.port} (API docs at /docs)")
    several = settings.serve_workers > 1
    config = uvicorn.Config("cmr_search.api.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                            workers=settings.serve_workers, log_level="info", access_log=settings.access_log,
                            http=BalancedHttpProtocol if several else "auto",  # even keep-alive shares
                            timeout_worker_healthcheck=120)  # a worker imports torch and loads encoders first
    metrics_dir = None
    try:
        sockets = None
        if several:
            # the workers' Prometheus values, summed by whichever worker a scrape reaches
            # (api/metrics.py); read by prometheus_client when a worker imports it
            metrics_dir = tempfile.mkdtemp(prefix="cmr-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            share = ConnectionShare(config.workers)
            if hasattr(socket, "SO_REUSEPORT"):  # each worker its own socket: the kernel deals the connections
                config.bind_socket().close()  # the address is free (else uvicorn's clear error), as uvicorn.run checks
                sockets = [WorkerListener(config.host, config.port, config.backlog, share)]
            else:
                sockets = [WorkerListener(config.host, config.port, config.backlog, share, config.bind_socket())]
        server = uvicorn.Server(config)
        try:
            Multiprocess(config, sockets=sockets).run() if sockets else server.run()
        except KeyboardInterrupt:
            pass
        if not sockets and not server.started:
            raise typer.Exit(3)  # uvicorn's startup-failure code, as uvicorn.run exits
    except CmrError as error:
        fail(error)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@keys_app.command("create")
def keys_create(
    store: StoreOpt = None,
    role: Annotated[str, typer.Option("--role", help="read (search, view) or write (also upload and delete).")] = "read",
    label: Annotated[str, typer.Option("--label", help="A note on who holds the key.")] = "",
    no_store: Annotated[bool, typer.Option("--no-store", help="Only print a new key (for CMR_API_KEY in an env file); register nothing.")] = False,
) -> None:
    """Create a key; it is printed once on stdout and only its hash is kept."""
    from cmr_search.api.auth import KeyRing

    if no_store:
        print(KeyRing.new_key())
        return
    root = store_dir(store, Settings())
    if not StoreLayout(root).meta.exists():
        fail(CmrError(f"{root} is not a cmr store (no store.json)"))
    try:
        key, record = KeyRing(root).create(role, label)
    except CmrError as error:
        fail(error)
    err.print(f"created {record.role} key {record.key_id}; it is shown once, store it now:")
    print(key)


@keys_app.command("list")
def keys_list(store: StoreOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys by id and role (never the keys)."""
    from dataclasses import asdict

    from cmr_search.api.auth import KeyRing

    records = KeyRing(store_dir(store, Settings())).list()
    if as_json:
        print(json.dumps([asdict(r) for r in records]))
        return
    for r in records:
        err.print(f"{r.key_id}  {r.role:<5}  {r.created_at}  {r.label}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (from `cmr keys list`).")],
                store: StoreOpt = None) -> None:
    """Revoke a key; running services refuse it from their next request."""
    from cmr_search.api.auth import KeyRing

    try:
        KeyRing(store_dir(store, Settings())).revoke(key_id)
    except CmrError as error:
        fail(error)
    err.print(f"revoked {key_id}")
