"""The ``cmr`` command line: one sub-command per pipeline stage, in pipeline order.

Human output and progress bars go to stderr; ``--json`` puts one JSON document on stdout.
Exit codes (DESIGN.md): 0 success, 2 usage error, 3 finished but some inputs were rejected.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

# Lance's native loggers warn on routine events ("No existing dataset at /abs/path/labels.lance,
# it will be created", on a store's first label import); keep stderr for what the user must
# read, without machine paths. lancedb's logger reads LANCEDB_LOG, Lance's own LANCE_LOG;
# both must be set before lancedb is imported.
for _var in ("LANCE_LOG", "LANCEDB_LOG"):
    os.environ.setdefault(_var, "error")

import typer
from rich.table import Table

from cmr_search.cli.common import StoreOpt, err, print_ingest, run_ingest
from cmr_search.cli.common import fail as _fail
from cmr_search.cli.common import store_dir as _store_dir
from cmr_search.cli.demo import demo
from cmr_search.cli.encoders import encoders_app, train_text
from cmr_search.cli.eval import eval_command
from cmr_search.cli.heads import heads_app
from cmr_search.cli.pacs import listen, sync
from cmr_search.cli.serve import keys_app, serve
from cmr_search.core.exceptions import CmrError, InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.core.settings import Settings
from cmr_search.store.config import IndexConfig

app = typer.Typer(
    help="cmr-search: embedding store and similarity search for cine cardiac MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False) -> None:
    """cmr-search: embedding store and similarity search for cine cardiac MRI."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    # pydicom logs every vendor quirk it tolerates; ingest reports what matters per file
    logging.getLogger("pydicom").setLevel(logging.INFO if verbose else logging.ERROR)


@app.command(rich_help_panel="1. Data")
def synth(
    studies: Annotated[int, typer.Option("--studies", min=1, help="Number of studies to generate.")] = 50,
    out: Annotated[Path, typer.Option("--out", help="Output directory (dicom/, reports.csv, labels.csv).")] = Path("synthetic"),
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the output is deterministic per seed.")] = 0,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Processes (default: all cores).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    site: Annotated[str, typer.Option("--site", help="Site profile: internal (the default cohort) or external (another hospital: 3 T, other vendors, narrative reports), for external validation.")] = "internal",
) -> None:
    """Generate a synthetic cine CMR cohort as real DICOM, with reports and labels."""
    from cmr_search.synth import generate_cohort
    from cmr_search.synth.site import SITES

    if site not in SITES:
        raise typer.BadParameter(f"unknown site {site!r}; choose one of {', '.join(SITES)}", param_hint="--site")
    summary = generate_cohort(studies, out, seed=seed, workers=workers, progress=True, site=site)
    if as_json:
        print(json.dumps(summary.to_dict() if hasattr(summary, "to_dict") else vars(summary), default=str))
    else:
        err.print(f"wrote {studies} studies to {out} (seed {seed}, site {site})")


@app.command(rich_help_panel="1. Data")
def ingest(
    paths: Annotated[list[Path] | None, typer.Argument(help="DICOM folders, zip files or single files (or --dicomweb).")] = None,
    store: StoreOpt = None,
    reports: Annotated[Path | None, typer.Option("--reports", help="CSV/Parquet: study_uid, report.")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV/Parquet keyed by study_uid.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Processes (default: $CMR_WORKERS or all cores).")] = None,
    frames: Annotated[int, typer.Option("--frames", min=4, help="Frames per clip over one cycle.")] = 16,
    size: Annotated[int, typer.Option("--size", min=32, help="Clip height and width in pixels (224 for MViT-B).")] = 128,
    fov_mm: Annotated[float, typer.Option("--fov-mm", min=50.0, help="Square field of view of a clip, mm.")] = 240.0,
    site: Annotated[str, typer.Option("--site", help="Site label stored with each clip.")] = "",
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Keep a study's good series when another fails.")] = False,
    dicomweb: Annotated[str | None, typer.Option("--dicomweb", help="Pull MR studies from this DICOMweb root (a PACS; Orthanc: http://host:8042/dicom-web) instead of files.", rich_help_panel="DICOMweb")] = None,
    query: Annotated[list[str] | None, typer.Option("--query", help="QIDO-RS filter KEY=VALUE (a DICOM keyword or tag), repeatable; ModalitiesInStudy=MR unless given.", rich_help_panel="DICOMweb")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Studies on or after this date, YYYY-MM-DD.", rich_help_panel="DICOMweb")] = None,
    token_env: Annotated[str | None, typer.Option("--token-env", help="Environment variable holding a bearer token.", rich_help_panel="DICOMweb")] = None,
    user: Annotated[str | None, typer.Option("--user", help="User name for HTTP basic auth (with --password-env).", rich_help_panel="DICOMweb")] = None,
    password_env: Annotated[str | None, typer.Option("--password-env", help="Environment variable holding the basic-auth password.", rich_help_panel="DICOMweb")] = None,
    connections: Annotated[int, typer.Option("--connections", min=1, max=32, help="Studies downloaded at once.", rich_help_panel="DICOMweb")] = 2,
    ray: Annotated[str | None, typer.Option("--ray", help="Run on a Ray cluster: 'local' starts one on this machine, 'auto' joins the running one, or its address (host:port, ray://host:port). Inputs and store on paths every node reads.", rich_help_panel="Cluster")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ingest report as JSON on stdout.")] = False,
) -> None:
    """Ingest DICOM into the store's clip table (idempotent; re-running adds nothing new).

    From files, or pulled from a PACS with --dicomweb URL: the same pipeline, a few
    downloaded studies at a time under the store's tmp/, deleted once ingested."""
    from cmr_search.ingest import IngestConfig
    from cmr_search.store import ClipConfig

    settings = Settings()
    cfg = IngestConfig(
        clip=ClipConfig(frames=frames, size=size, fov_mm=fov_mm),
        workers=workers or settings.workers or os.cpu_count() or 1,
        allow_partial=allow_partial,
        site=site,
        ray=ray,
    )
    pull_options = query or since or token_env or user or password_env
    if ray is not None and dicomweb:
        err.print("[red]error:[/] --ray ingests files; a DICOMweb pull runs on this machine (drop --ray)")
        raise typer.Exit(2)
    if bool(paths) == bool(dicomweb):
        err.print("[red]error:[/] give DICOM folders, zips or files, or --dicomweb URL (exactly one source)")
        raise typer.Exit(2)
    if paths and pull_options:
        err.print("[red]error:[/] --query, --since, --token-env, --user and --password-env go with --dicomweb URL")
        raise typer.Exit(2)
    root = _store_dir(store, settings)
    if paths:
        report = run_ingest(paths, root, cfg, settings, reports, labels)
    else:
        report = _pull(dicomweb, root, cfg, settings, reports, labels, query or [], since, token_env, user,
                       password_env, connections)
    if as_json:
        print(json.dumps(report.to_dict()))
    print_ingest(report)
    raise typer.Exit(report.exit_code)


def _pull(url, root, cfg, settings: Settings, reports, labels, query, since, token_env, user, password_env, connections):
    """``cmr ingest --dicomweb``: the flags to the pull's typed settings; a domain error exits 2."""
    from cmr_search.ingest.dicomweb import (
        PullConfig,
        parse_query,
        parse_since,
        pull_into,
        source_from_env,
    )

    try:
        # secrets come from the variables the user names, never from a flag's value
        source = source_from_env(url, os.environ, token_env=token_env, username=user, password_env=password_env)
        pull_cfg = PullConfig(filters=parse_query(query), since=parse_since(since) if since else None,
                              connections=connections, studies_on_disk=max(12, connections))
        return pull_into(source, root, cfg, pull_cfg, settings.patient_salt, reports=reports, labels=labels)
    except CmrError as error:
        _fail(error)


@app.command("train-encoder", rich_help_panel="2. Encoder")
def train_encoder(
    store: StoreOpt = None,
    config: Annotated[str, typer.Option("--config", help="Named config (encoder/configs/*.json) or a JSON path.")] = "mvit_xs_cpu",
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", min=0.1, help="Stop after this long (a checkpoint is written).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop at this step (default: the config's).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last checkpoint.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the config's seed.")] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="Run folder under STORE/encoders/runs.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if present).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (on a GPU: faster steps after a minute of compiling).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Train the contrastive video-report encoder on the store's clips and reports.

    Checkpoints (model + optimizer) every N steps under STORE/encoders/runs/NAME; the
    finished model goes to STORE/encoders/<model_id> and becomes the store's LATEST.
    Multi-GPU: `torchrun --nproc-per-node G -m cmr.cli train-encoder ...`.
    """
    from dataclasses import replace

    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.train import Trainer

    root = _store_dir(store, Settings())
    try:
        cfg = load_config(config)
        if seed is not None:
            cfg.train = replace(cfg.train, seed=seed)
        run_dir = StoreLayout(root).run(run_name) if run_name else None
        trainer = Trainer(root, cfg, run_dir=run_dir, device=device, resume=resume, log=err.print, compile=compile)
        result = trainer.fit(max_minutes=max_minutes, max_steps=max_steps)
    except CmrError as error:
        _fail(error)
    if result is None:  # a DDP rank other than 0
        return
    summary = {"model_id": result.model_id, "checkpoint": str(result.checkpoint), "step": result.step,
               "seconds": round(result.seconds, 1), "val": result.val}
    if as_json:
        print(json.dumps(summary))
    else:
        err.print(f"validation text->study retrieval: {result.val}")


@app.command(rich_help_panel="2. Encoder")
def embed(
    store: StoreOpt = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Encoder folder or the published .ckpt (default: the store's LATEST).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda (default: cuda if present).")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Accept a checkpoint that fills only part of the model.")] = False,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle a .ckpt that holds Python objects (only for files you trust).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the vision tower (on a GPU: 2.4x faster after ~45 s of compiling).")] = False,
    set_default: Annotated[bool, typer.Option("--set-default", help="Make this model the store's default (the first model embedded becomes it anyway).")] = False,
    config: Annotated[str | None, typer.Option("--config", help="Architecture of a published .ckpt: a named config or JSON path (default: mvit_b_16x4_published).")] = None,
    ray: Annotated[str | None, typer.Option("--ray", metavar="local|auto|ADDRESS", help="Embed on a Ray cluster, one encoder actor per GPU (or CPU): 'local' starts one on this machine, 'auto' joins the running one, or its address (host:port, ray://host:port). The store on a path every node reads.", rich_help_panel="Cluster")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Embed every clip into the `views` table, pool each study into `studies`, update the indexes.

    The checkpoint (a folder of any store, or the published .ckpt) is registered in this
    store (`cmr encoders list`). Resumable: clips already embedded with this checkpoint's
    model_id are skipped.
    """
    from cmr_search.encoder.embed import embed_store
    from cmr_search.encoder.train import latest_checkpoint

    root = _store_dir(store, Settings())
    try:
        report = embed_store(root, checkpoint or latest_checkpoint(root), batch_size=batch_size, device=device,
                             allow_partial=allow_partial, trust_pickle=trust_checkpoint, compile=compile, config=config,
                             index_config=IndexConfig.from_settings(Settings()), set_default=set_default or None,
                             ray=ray)
    except CmrError as error:
        _fail(error)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        err.print(f"model {report.model_id}: {report.clips_embedded} clips embedded, {report.clips_skipped} already done, "
                  f"{report.studies} studies pooled in {report.seconds:.1f} s")
        if report.default_model != report.model_id:
            err.print(f"the store's default model stays {report.default_model}; search this one with --model-id "
                      f"{report.model_id}, or make it the default with `cmr encoders set-default {report.model_id}`")


@app.command(rich_help_panel="3. Search")
def search(
    store: StoreOpt = None,
    text: Annotated[str | None, typer.Option("--text", help="Text-to-scan: a findings description.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Scan-to-scan: the k nearest other studies to this study_uid.")] = None,
    queries: Annotated[Path | None, typer.Option("--queries", help="Text-to-scan for every line of this file ('-': stdin) with one model load; JSON lines out.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Studies to return.")] = 10,
    where: Annotated[str | None, typer.Option("--where", help="SQL filter, e.g. \"sex = 'F' AND age > 60\", \"view = 'SAX'\", \"lvef < 40\".")] = None,
    model_id: Annotated[str | None, typer.Option("--model-id", help="Embeddings of this encoder (default: the store's default model).")] = None,
    other_patients: Annotated[bool, typer.Option("--other-patients", help="With --study: leave out the patient's other studies too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Search the store: studies ranked by similarity to a text or to a stored study.

    A filter that names a view column (view, slice_index) searches view embeddings and
    returns each study once, at its best view.
    """
    from cmr_search.store.search import Searcher

    if sum(x is not None for x in (text, study, queries)) != 1:
        err.print("[red]error:[/] give exactly one of --text, --study or --queries")
        raise typer.Exit(2)
    try:
        settings = Settings()
        root = _store_dir(store, settings)
        encode_text = None
        if study is None:
            from cmr_search.encoder.embed import TextQueryEncoder

            encode_text = TextQueryEncoder(root)
        searcher = Searcher(root, model_id, IndexConfig.from_settings(settings), encode_text=encode_text)
        if queries is not None:
            lines = _query_lines(queries)
            for line in lines:  # one model, loaded once; a line per query as it is answered
                hits = searcher.by_text(line, k, where)
                print(json.dumps({"model_id": searcher.model_id, "query": {"text": line}, "where": where, "k": k,
                                  "hits": [h.to_dict() for h in hits]}), flush=True)
            err.print(f"{len(lines)} queries answered (model {searcher.model_id})")
            return
        hits = (searcher.by_text(text, k, where) if text is not None
                else searcher.by_study(study, k, where, exclude_same_patient=other_patients))
    except CmrError as error:
        _fail(error)
    if as_json:
        query = {"text": text} if text is not None else {"study_uid": study}
        print(json.dumps({"model_id": searcher.model_id, "query": query, "where": where, "k": k,
                          "level": searcher.level_for(where), "hits": [h.to_dict() for h in hits]}))
        return
    table = Table(title=f"{len(hits)} studies (model {searcher.model_id})")
    for col in ("#", "study_uid", "score", "view", "views", "sex", "age", "site", "date"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):
        m = h.metadata
        view = f"{h.view}{'' if h.slice_index is None else f' {h.slice_index}'}" if h.view else ""
        table.add_row(str(rank), h.study_uid, f"{h.score:.3f}", view, " ".join(m.get("views_present") or []),
                      m.get("sex") or "", "" if m.get("age") is None else f"{m['age']:.0f}", m.get("site") or "",
                      m.get("study_date") or "")
    err.print(table)


def _query_lines(path: Path) -> list[str]:
    """The queries of a file, one per line; blank lines and ``#`` comments left out."""
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the queries in {path}: {error}; give a UTF-8 text file, one query per line") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise InputError(f"{path} holds no query (one per line; blank lines and # comments are skipped)")
    return lines


@app.command(rich_help_panel="3. Search")
def delete(
    store: StoreOpt = None,
    study: Annotated[list[str] | None, typer.Option("--study", help="study_uid to withdraw (repeatable).")] = None,
    patient: Annotated[list[str] | None, typer.Option("--patient", help="patient_key to withdraw, every study (repeatable).")] = None,
    patient_id: Annotated[bool, typer.Option("--patient-id", help="Read raw PatientIDs from stdin (one per line), keyed with the store's salt; never logged.")] = False,
    keep_history: Annotated[bool, typer.Option("--keep-history", help="Only hide the rows; keep old table versions (recoverable).")] = False,
    readmit_: Annotated[bool, typer.Option("--readmit", help="Lift the withdrawal of these studies or patients (a patient's with every study withdrawn with them), so they may be ingested again.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Withdraw studies or patients everywhere: clips, reports, labels, embeddings, indexes.

    Old table versions are rewritten away, so the data leaves the disk (unless --keep-history).
    A withdrawn study or patient is not stored again by any later ingest, upload or embed
    until `--readmit` lifts its withdrawal.
    """
    from cmr_search.store.embedding_store import EmbeddingStore
    from cmr_search.store.patients import patient_keys_for
    from cmr_search.store.withdrawal import readmit, withdraw

    settings = Settings()
    root = _store_dir(store, settings)
    keys = list(patient or [])
    try:
        emb = EmbeddingStore.open(root)
        if patient_id:
            keys += patient_keys_for(emb.root, sys.stdin.read().splitlines(), settings.patient_salt)
        if not study and not keys:
            err.print("[red]error:[/] give --study, --patient or --patient-id (with IDs on stdin)")
            raise typer.Exit(2)
        if readmit_:
            lifted = readmit(emb, study_uids=list(study or []), patient_keys=keys)
        else:
            report = withdraw(emb, study_uids=list(study or []), patient_keys=keys, purge=not keep_history)
    except CmrError as error:
        _fail(error)
    if readmit_ and as_json:
        print(json.dumps({"readmitted": lifted}))
    elif readmit_:
        err.print(f"readmitted {lifted} withdrawn studies or patients; ingest their DICOM to store them again")
    elif as_json:
        print(json.dumps(report.to_dict()))
    else:
        rows = ", ".join(f"{name} {n}" for name, n in report.rows_deleted.items())
        err.print(f"withdrew {len(report.study_uids)} studies; rows deleted: {rows}")


app.command("train-text", rich_help_panel="2. Encoder")(train_text)
app.command("listen", rich_help_panel="1. Data")(listen)
app.command("sync", rich_help_panel="1. Data")(sync)
app.add_typer(encoders_app, name="encoders", rich_help_panel="2. Encoder")
app.add_typer(heads_app, name="heads", rich_help_panel="4. Heads")
app.command("eval", rich_help_panel="5. Evaluation")(eval_command)
app.command("serve", rich_help_panel="6. Service")(serve)
app.add_typer(keys_app, name="keys", rich_help_panel="6. Service")


app.command("demo", rich_help_panel="9. Everything")(demo)


if __name__ == "__main__":
    app()
