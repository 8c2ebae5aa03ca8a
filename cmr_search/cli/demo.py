"""``cmr demo``: the whole pipeline on the embedded synthetic cohort, from nothing to a running
search service. Every stage prints its time, and a second run skips the stages whose outputs
exist and match (the cohort's size and seed, the clips, the encoder, its embeddings, the heads
and the report of this encoder)."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from cmr_search.cli.common import StoreOpt, err, fail, print_ingest, run_ingest, store_dir
from cmr_search.core.exceptions import CmrError, InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.core.settings import Settings
from cmr_search.store.config import IndexConfig

QUERY = "severe LV dilatation with apical thrombus"
# a fixed number of steps, not minutes: every newcomer gets the same model however busy
# the machine is (five minutes were 14 steps on a loaded machine and 430 on an idle one)
DEMO_STEPS = 400
HEADS = {"lvef-demo": ["lvef"], "disease-demo": None}  # None: every 0/1 label column


@contextmanager
def _stage(title: str, command: str = ""):
    """A titled stage (with the command that does the same on its own) that prints its time."""
    err.rule(title)
    if command:
        err.print(f"  [dim]$ {command}[/]", highlight=False)
    started = time.perf_counter()
    yield
    err.print(f"[dim]  ({time.perf_counter() - started:.1f} s)[/]")


def _skip(title: str, why: str) -> None:
    err.rule(title)
    err.print(f"  skipped: {why}", highlight=False)


def _cohort(data: Path, studies: int, seed: int) -> bool:
    """Whether ``data`` already holds this cohort; refuses a different one."""
    manifest = data / "cohort.json"
    if not manifest.exists():
        if (data / "labels.csv").exists():
            raise InputError(f"{data} holds a cohort of unknown size and seed; remove it or use another --store")
        return False
    found = json.loads(manifest.read_text())
    if found != {"studies": studies, "seed": seed}:
        raise InputError(f"{data} holds a cohort of {found['studies']} studies (seed {found['seed']}), not {studies} "
                         f"(seed {seed}); remove {data.parent} or use another --store")
    return True


def demo(
    store: StoreOpt = None,
    studies: Annotated[int, typer.Option("--studies", min=4, help="Synthetic studies to generate.")] = 200,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    encoder_steps: Annotated[int, typer.Option("--encoder-steps", min=1, help="Training steps of the CPU encoder (its learning-rate schedule spans them).")] = DEMO_STEPS,
    eval_seeds: Annotated[int, typer.Option("--eval-seeds", min=1, help="Replicates per label share in the evaluation.")] = 5,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Start the search service at the end.")] = True,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
) -> None:
    """Run everything on the synthetic cohort: synth, ingest, train, embed, search, heads, eval, serve.

    A second run reuses what is done. Ends serving the store on http://HOST:PORT with a new
    read key printed (--no-serve: stop after the report).
    """
    from cmr_search.ingest import IngestConfig
    from cmr_search.synth import generate_cohort

    settings = Settings()
    root = store_dir(store, settings) if store else Path(settings.store or "demo/store")
    data = root.parent / "synthetic"
    started = time.perf_counter()
    try:
        if _cohort(data, studies, seed):
            _skip("1. synthetic cohort", f"{studies} studies (seed {seed}) already in {data}")
        else:
            with _stage(f"1. synthetic cohort: {studies} studies", f"cmr synth --studies {studies} --seed {seed} --out {data}"):
                generate_cohort(studies, data, seed=seed, progress=True)
                (data / "cohort.json").write_text(json.dumps({"studies": studies, "seed": seed}))
        wanted = _study_uids(data / "labels.csv")
        if StoreLayout(root).meta.exists() and wanted <= _stored_study_uids(root):
            _skip("2. ingest", f"all {len(wanted)} studies are in {root}")
        else:
            with _stage("2. ingest", f"cmr ingest {data / 'dicom'} --store {root} --reports {data / 'reports.csv'} "
                                     f"--labels {data / 'labels.csv'}"):
                cfg = IngestConfig(workers=settings.workers or os.cpu_count() or 1)
                report = run_ingest([data / "dicom"], root, cfg, settings, data / "reports.csv", data / "labels.csv")
                print_ingest(report)
        model_id = _encoder(root, encoder_steps)
        _embed(root, model_id, settings)
        with _stage("5. search", f'cmr search --store {root} --text "{QUERY}" -k 5'):
            from cmr_search.encoder.embed import TextQueryEncoder
            from cmr_search.store.search import Searcher

            searcher = Searcher(root, model_id, IndexConfig.from_settings(settings), encode_text=TextQueryEncoder(root))
            for rank, hit in enumerate(searcher.by_text(QUERY, 5), 1):
                err.print(f"  {rank}. {hit.study_uid}  score {hit.score:.3f}  "
                          f"views {' '.join(hit.metadata.get('views_present') or [])}")
        _heads(root, model_id, searcher)
        _evaluate(root, model_id, eval_seeds, settings)
    except CmrError as error:
        fail(error)
    err.rule(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    _serve(root, searcher, host, port, serve_after)


def _study_uids(labels_csv: Path) -> set[str]:
    import csv

    with open(labels_csv, newline="") as fp:
        return {row["study_uid"] for row in csv.DictReader(fp)}


def _stored_study_uids(root: Path) -> set[str]:
    from cmr_search.store.clip_store import ClipStore

    store = ClipStore.open(root)
    return store.study_uids() & store.table_study_uids("labels") & store.table_study_uids("reports")


def _encoder(root: Path, steps: int) -> str:
    """The store's trained encoder, trained now for ``steps`` steps if there is none."""
    model_id = StoreLayout(root).latest_model_id()
    if model_id is not None:
        _skip("3. encoder", f"{model_id} is trained (STORE/encoders/LATEST)")
        return model_id
    with _stage(f"3. train the CPU encoder for {steps} steps", f"cmr train-encoder --store {root} --max-steps {steps}"):
        from dataclasses import replace

        from cmr_search.encoder.config import load_config
        from cmr_search.encoder.train import Trainer

        cfg = load_config("mvit_xs_cpu")
        cfg.train = replace(cfg.train, max_steps=steps)
        run = StoreLayout(root).run("demo")
        trainer = Trainer(root, cfg, run_dir=run, resume=(run / "checkpoint").exists(), log=err.print)
        result = trainer.fit()
        err.print(f"  {result.step} steps in {result.seconds / 60:.1f} min ({result.seconds / max(result.step, 1):.2f} s/step)")
        return result.model_id


def _embed(root: Path, model_id: str, settings: Settings) -> None:
    """Every clip and study embedded by ``model_id`` (only what is missing)."""
    from cmr_search.encoder.embed import embed_store
    from cmr_search.store.embedding_store import EmbeddingStore

    store = EmbeddingStore.open(root)
    clips = store.clip_store.count_clips()
    if clips and store.count("views", model_id) == clips and store.count("studies", model_id):
        _skip("4. embed", f"all {clips} clips are embedded by {model_id}")
        return
    with _stage("4. embed", f"cmr embed --store {root}"):
        emb = embed_store(root, StoreLayout(root).encoder(model_id), index_config=IndexConfig.from_settings(settings))
        err.print(f"model {model_id}: {emb.clips_embedded} clips embedded ({emb.clips_skipped} already), "
                  f"{emb.studies} studies")


def _heads(root: Path, model_id: str, searcher) -> None:
    """An attention-MIL LVEF head and a multi-label disease head, unless this encoder has them."""
    from cmr_search.evals.efficiency import phenotype_columns
    from cmr_search.heads import HeadConfig, HeadRegistry, train_head
    from cmr_search.heads.data import label_table

    registry = HeadRegistry(root)
    have = {c.get("name"): c.get("model_id") for c in registry.cards()}
    for name, labels in HEADS.items():
        if have.get(name) == model_id:
            _skip(f"6. head {name}", f"trained on {model_id}")
            continue
        labels = labels or phenotype_columns(label_table(searcher.store, None)[0])
        with _stage(f"6. head {name}", f"cmr heads train --store {root} --kind mil --name {name} --label "
                                         + " --label ".join(labels)):
            head, _ = train_head(root, labels, HeadConfig(kind="mil"), model_id=model_id, name=name, replace=True)
            test = head.card["metrics"]["test"]
            if "lvef" in test:
                m = test["lvef"]
                err.print(f"  LVEF: test MAE {m['mae']:.1f} points on {m['n']} held-out studies, "
                          f"trained in {head.card['training_seconds']:.1f} s")
            else:
                aucs = {k: v["auroc"] for k, v in test.items() if v.get("auroc") is not None}
                err.print(f"  {len(labels)} labels: held-out AUROC " + ", ".join(f"{k} {v:.2f}" for k, v in aucs.items()))


def _evaluate(root: Path, model_id: str, seeds: int, settings: Settings) -> None:
    from cmr_search.evals.config import EvalConfig
    from cmr_search.evals.evaluate import evaluate_store
    from cmr_search.evals.report import write_report

    done = StoreLayout(root).eval / "metrics.json"
    if done.exists() and json.loads(done.read_text()).get("run", {}).get("models", {}).get("contrastive") == model_id:
        _skip("7. evaluate", f"{done.parent / 'report.html'} is of {model_id}")
        return
    with _stage("7. evaluate", f"cmr eval --store {root}"):
        evaluation = evaluate_store(root, EvalConfig(seeds=seeds), model_id, index_config=IndexConfig.from_settings(settings),
                                    log=err.print)
        _, page = write_report(StoreLayout(root).eval, evaluation.metrics, evaluation.figures)
        lvef = evaluation.metrics.get("heads", {}).get("lvef", {})
        if "contrastive" in lvef and "baseline" in lvef:
            err.print(f"  LVEF MAE on held-out studies: {lvef['contrastive']['mae']:.1f} (contrastive) vs "
                      f"{lvef['baseline']['mae']:.1f} (random-init baseline)")
        err.print(f"  report: {page}")


def _serve(root: Path, searcher, host: str, port: int, serve_after: bool) -> None:
    """Print how to reach the service (a new read key, an example query), then serve."""
    from cmr_search.api.auth import KeyRing

    key, record = KeyRing(root).create("read", "cmr demo")
    url = f"http://{host}:{port}"
    err.rule("8. serve")
    err.print(f"  [dim]$ cmr serve --store {root} --host {host} --port {port}[/]", highlight=False)
    err.print(f"  web page:   {url}/   (paste the key into the page)\n  API docs:   {url}/docs\n"
              f"  API key:    {key}   (read role, id {record.key_id}; shown once, only its hash is kept)")
    err.print(f"  example:    curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
              f"-d '{{\"query\": \"{QUERY}\", \"k\": 3}}' {url}/search/text")
    for rank, hit in enumerate(searcher.by_text(QUERY, 3), 1):
        err.print(f"              {rank}. {hit.study_uid}  score {hit.score:.3f}")
    if not serve_after:
        err.print(f"  (--no-serve: start it with `cmr serve --store {root}`)")
        return
    from cmr_search.cli.serve import serve

    serve(store=root, host=host, port=port, workers=None, config=None, no_auth=False)
