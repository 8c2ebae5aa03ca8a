"""``cmr listen``: receive studies by DICOM push (C-STORE) and make each searchable as its
association ends; ``cmr sync``: keep a store in step with a DICOMweb archive."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from cmr_search.cli.common import StoreOpt, err, fail, store_dir
from cmr_search.core.exceptions import CmrError
from cmr_search.core.settings import Settings


def listen(
    store: StoreOpt = None,
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title (what the archive routes to).")] = "CMRSEARCH",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="DICOM port.")] = 11112,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "0.0.0.0",
    calling: Annotated[list[str] | None, typer.Option("--calling-ae", help="Accept only this calling AE title (repeatable; default: any).")] = None,
    quiet_seconds: Annotated[float, typer.Option("--quiet-seconds", min=0.0, help="Also ingest what an open association sent once it is idle this long (0: at its end only).")] = 0.0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ingest processes per arrival.")] = 1,
    site: Annotated[str, typer.Option("--site", help="Site label stored with each clip.")] = "",
) -> None:
    """Receive studies by DICOM push (a C-STORE SCP) and ingest and embed each batch.

    Each association's instances are ingested, and embedded with the store's default model,
    when it ends; stop with Ctrl-C (what was received is ingested first).
    """
    from cmr_search.pacs.arrival import ingest_and_embed
    from cmr_search.pacs.listener import ListenConfig, StudyListener
    from cmr_search.store.config import IndexConfig

    settings = Settings()
    root = store_dir(store, settings)

    def arrived(folder: Path) -> None:
        report = ingest_and_embed(root, [folder], settings.patient_salt, workers=workers, site=site,
                                  index_config=IndexConfig.from_settings(settings))
        print(json.dumps(report.to_dict()), flush=True)
        err.print(f"{report.studies} studies ingested ({report.clips_written} clips, {len(report.rejected)} rejected), "
                  f"{report.clips_embedded} clips embedded with {report.model_id or 'no model yet'} "
                  f"in {report.seconds:.1f} s")

    stop = threading.Event()
    try:
        listener = StudyListener(root, ListenConfig(ae_title, host, port, tuple(calling or ()), quiet_seconds), arrived)
        listener.start()
    except CmrError as error:
        fail(error)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    err.print(f"listening as {ae_title} on {host}:{listener.port}; Ctrl-C stops")
    stop.wait()
    err.print("stopping: ingesting what was received")
    listener.stop(drain=True)


def sync(
    dicomweb: Annotated[str, typer.Option("--dicomweb", help="The archive's DICOMweb root (Orthanc: http://host:8042/dicom-web).")],
    store: StoreOpt = None,
    every: Annotated[float, typer.Option("--every", min=1.0, help="Seconds between cycles.")] = 60.0,
    once: Annotated[bool, typer.Option("--once", help="One cycle, then exit.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Search the whole archive, not only from the cursor (studies that arrived with old dates).")] = False,
    query: Annotated[list[str] | None, typer.Option("--query", help="QIDO-RS filter KEY=VALUE, repeatable; ModalitiesInStudy=MR unless given.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Never before this date, YYYY-MM-DD.")] = None,
    token_env: Annotated[str | None, typer.Option("--token-env", help="Environment variable holding a bearer token.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="User name for basic auth (Orthanc).")] = None,
    password_env: Annotated[str | None, typer.Option("--password-env", help="Environment variable holding the basic-auth password.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ingest processes.")] = 1,
) -> None:
    """Keep the store in step with a DICOMweb archive: ingest and embed what is new.

    Each cycle searches from the store's cursor, downloads only studies the store does not
    hold, and embeds them with the default model; a killed sync resumes without gap or
    duplicate. One JSON line per cycle on stdout.
    """
    import os

    from cmr_search.ingest.dicomweb import PullConfig, parse_query, parse_since, source_from_env
    from cmr_search.pacs.sync import Syncer
    from cmr_search.store.config import IndexConfig

    settings = Settings()
    root = store_dir(store, settings)
    try:
        source = source_from_env(dicomweb, os.environ, token_env=token_env, username=user, password_env=password_env)
        pull_cfg = PullConfig(filters=parse_query(query or []), since=parse_since(since) if since else None)
        syncer = Syncer(root, source, pull_cfg, settings.patient_salt, IndexConfig.from_settings(settings), workers)
        if once:
            report = syncer.once(full=full, progress=True)
    except CmrError as error:
        fail(error)
    if once:
        print(json.dumps(report.to_dict()), flush=True)
        return

    def cycle(report) -> None:
        print(json.dumps(report.to_dict()), flush=True)
        err.print(f"{report.studies_written} new studies ({report.already_stored} already stored), "
                  f"{report.clips_embedded} clips embedded in {report.seconds:.1f} s; cursor {report.cursor}")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    def failed(error: CmrError) -> None:
        err.print(f"[red]sync failed:[/] {error}")

    err.print(f"syncing with {syncer.archive} every {every:g} s; Ctrl-C stops")
    if full:  # the whole archive once, then from the cursor; a failure here is reported like any cycle's
        try:
            cycle(syncer.once(full=True))
        except CmrError as error:
            failed(error)
    syncer.run(every, stop, on_cycle=cycle, on_error=failed)
