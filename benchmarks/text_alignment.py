"""Text search for a video model without a text tower: ``cmr train-text`` against the joint
recipe and against no alignment at all, side by side on one cohort's held-out patients
(issue 25).

    python benchmarks/text_alignment.py --store DIR [--text-minutes 3] [--json out.json]
    python benchmarks/text_alignment.py --studies 400
    python benchmarks/text_alignment.py --store DIR --work KEEP   # keep (a) for later runs

(a) the joint CPU recipe (``mvit_xs_cpu``, its video and text towers trained together for
    its budget), its video tower then embedding the whole store (``cmr embed``);
(b) the same video model's stored embeddings, and ``cmr train-text`` (``minilm_cpu``) on
    them for at most ``--text-minutes`` of wall time on this machine, its set-up included;
(c) the floor: the packaged MiniLM, locked, with an untrained projection: what a user of
    the published checkpoint has without alignment.

Each is scored with its own text tower on the same stored study vectors of the same
held-out patients (a quarter, ``split_seed`` 0, never trained on by either): own-report
R@k, the phrase suite and paraphrases as the search embeds queries (benchmarks/queries.py),
zero-shot AUROC. Step costs: the joint recipe's seconds per step, timed beside (b) in the
same process, against train-text's (mean, and the median of its last half, once the locked
layers' cache is warm).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from encoder import labels_of, make_store, train_split
from queries import text_figures

from cmr_search.core.layout import StoreLayout

FIGURES = [("R@1", True), ("R@5", True), ("R@10", True), ("positive_P@10", True), ("combination_P@10", True),
           ("negated_rate_over_prevalence", False), ("severity_exact", True), ("para_positive", True),
           ("para_negated", False), ("para_severity", True), ("para_combination", True), ("zero_shot_AUROC", True)]
#: (b) must reach (a) on these (issue 25)
GOALS = ["R@10", "positive_P@10", "combination_P@10", "negated_rate_over_prevalence", "severity_exact"]


def joint(store: Path, seed: int, steps: int | None, work: Path) -> dict:
    """(a): train the joint recipe and embed the store with it; kept in ``work`` for reruns."""
    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.embed import embed_store

    done = work / "joint.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = load_config("mvit_xs_cpu")
    _, result, _, _, test = train_split(store, cfg, seed, 0, steps or cfg.train.max_steps, work / "joint-run")
    t0 = time.perf_counter()
    embed_store(store, result.checkpoint, progress=True)
    out = {"model_id": result.model_id, "steps": result.step, "train_seconds": result.seconds,
           "step_seconds": result.seconds / result.step, "embed_seconds": time.perf_counter() - t0,
           "test": [s.study_uid for s in test]}
    done.write_text(json.dumps(out))
    return out


def joint_step_seconds(store: Path, seed: int, steps: int, work: Path) -> float:
    """Seconds per step of the joint recipe measured now, beside (b) on the same machine
    (``steps`` steps after 5 of warm-up): (a)'s own run may have shared the CPU."""
    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.train import Trainer

    cfg = load_config("mvit_xs_cpu")
    cfg.train = replace(cfg.train, seed=seed, split_seed=0, val_fraction=0.25, eval_every=10_000,
                        checkpoint_every=10_000)
    trainer = Trainer(store, cfg, run_dir=work / f"joint-timing-{time.time_ns()}", device="cpu", progress=False,
                      log=lambda *_: None)
    trainer.fit(max_steps=5)
    before = trainer.elapsed
    trainer.fit(max_steps=5 + steps)
    return (trainer.elapsed - before) / steps


def align(store: Path, model_id: str, seed: int, minutes: float, work: Path, recipe: str) -> dict:
    """(b): ``cmr train-text`` on (a)'s stored embeddings within ``minutes`` of wall time."""
    from cmr_search.encoder.config import load_text_align_config
    from cmr_search.encoder.train_text import TextTrainer

    cfg = replace(load_text_align_config(recipe), seed=seed, split_seed=0, val_fraction=0.25)
    t0 = time.perf_counter()
    run_dir = work / f"text-run-{time.time_ns()}"
    trainer = TextTrainer(store, cfg, model_id, run_dir=run_dir, progress=True, log=print)
    setup = time.perf_counter() - t0
    result = trainer.fit(max_minutes=minutes - setup / 60)
    with open(run_dir / "metrics.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    seconds = np.diff([0.0] + [float(r["seconds"]) for r in rows])
    return {"model_id": result.model_id, "steps": result.step, "setup_seconds": setup,
            "wall_seconds": time.perf_counter() - t0, "train_seconds": result.seconds,
            "step_seconds": result.seconds / result.step,
            "warm_step_seconds": float(np.median(seconds[len(seconds) // 2 :])),
            "cached_texts": len(trainer.cache.sentences) + sum(len(v) for v in trainer.cache.reports.values()),
            "cache_mb": trainer.cache.bytes / 1e6,
            "held_out": [s.study_uid for s in trainer.held_out.studies_list]}


def score(tower, store: Path, model_id: str, test: list[str], labels: dict) -> dict:
    """Every figure of one text tower on the stored study vectors of the held-out studies."""
    from cmr_search.encoder.data import ClipCorpus
    from cmr_search.metrics.retrieval import retrieval_summary
    from cmr_search.store.embedding_store import EmbeddingStore

    tables = EmbeddingStore.open(store)
    rows = tables.study_rows(model_id, ["study_uid", "vector"])
    vec = dict(zip(rows["study_uid"].to_pylist(), tables.vectors(rows)))
    by_uid = {s.study_uid: s for s in ClipCorpus(store).studies}
    studies = [by_uid[u] for u in test if u in vec and u in labels]
    s = np.stack([vec[st.study_uid] for st in studies]).astype(np.float32)
    reports = tower([st.report for st in studies])
    out = retrieval_summary(reports @ s.T, np.arange(len(studies)))
    return out | text_figures(tower, s, studies, labels)


def tower_of(folder: Path | None):
    """A text tower's ``texts -> [N, D]``: a model folder's, or (None) the untrained floor."""
    from cmr_search.encoder.checkpoint import load_text_encoder

    text = load_text_encoder(folder)

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return text.encode(list(texts)).float().numpy()

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an ingested store with reports and labels (copied, not changed)")
    parser.add_argument("--studies", type=int, default=400, help="cohort size when no --store is given")
    parser.add_argument("--work", type=Path, help="keep the store copy and (a) here; a rerun reuses (a)")
    parser.add_argument("--joint-steps", type=int, help="joint training steps (default: the recipe's)")
    parser.add_argument("--text-minutes", type=float, default=3.0, help="wall-time budget of (b), set-up included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--joint-timing-steps", type=int, default=20, help="joint steps timed beside (b)")
    parser.add_argument("--retime", action="store_true",
                        help="time the joint steps again (a rerun with --work reuses the first timing otherwise)")
    parser.add_argument("--text-config", default="minilm_cpu", help="the train-text recipe: a name or JSON path")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        store = work / "store"
        if not store.exists():
            if args.store:
                shutil.copytree(args.store, store)
            else:
                make_store(args.studies, 11, work)
        a = joint(store, args.seed, args.joint_steps, work)
        print(f"(a) joint: {a['steps']} steps, {a['step_seconds']:.2f} s per step; embedding {a['embed_seconds']:.0f} s",
              flush=True)
        if args.retime or "step_seconds_now" not in a:
            a["step_seconds_now"] = joint_step_seconds(store, args.seed, args.joint_timing_steps, work)
            (work / "joint.json").write_text(json.dumps(a))
        print(f"(a) joint step measured {'now' if args.retime else 'before'}: {a['step_seconds_now']:.2f} s", flush=True)
        b = align(store, a["model_id"], args.seed, args.text_minutes, work, args.text_config)
        assert set(a["test"]) <= set(b["held_out"]), "(b) held out other patients than (a)"
        print(f"(b) train-text: {b['steps']} steps in {b['wall_seconds']:.0f} s wall ({b['setup_seconds']:.0f} s set-up), "
              f"{b['step_seconds']:.3f} s per step, {b['warm_step_seconds']:.3f} s warm", flush=True)
        labels = labels_of(store)
        layout = StoreLayout(store)
        figures = {
            "a_joint": score(tower_of(layout.encoder(a["model_id"])), store, a["model_id"], a["test"], labels),
            "b_train_text": score(tower_of(layout.encoder(b["model_id"])), store, a["model_id"], a["test"], labels),
            "c_floor": score(tower_of(None), store, a["model_id"], a["test"], labels),
        }
    print(f"\n{len(a['test'])} held-out studies, {torch.get_num_threads()} threads")
    print(f"{'figure':<32}{'(a) joint':>12}{'(b) train-text':>16}{'(c) floor':>12}   goal")
    met = []
    for key, higher in FIGURES:
        va, vb, vc = (figures[k][key] for k in ("a_joint", "b_train_text", "c_floor"))
        goal = ""
        if key in GOALS:
            ok = vb >= va if higher else vb <= va
            met.append(ok)
            goal = f"(b) {'>=' if higher else '<='} (a): {'met' if ok else 'NOT met'}"
        print(f"{key:<32}{va:>12.3f}{vb:>16.3f}{vc:>12.3f}   {goal}")
    ratio = b["step_seconds"] / a["step_seconds_now"]
    warm = b["warm_step_seconds"] / a["step_seconds_now"]
    print(f"{'step seconds':<32}{a['step_seconds_now']:>12.3f}{b['step_seconds']:>16.3f}{'':>12}   "
          f"ratio {ratio:.3f} (warm {warm:.3f}), goal <= 0.1: {'met' if ratio <= 0.1 else 'NOT met'}")
    print(f"{'wall minutes':<32}{a['train_seconds'] / 60:>12.1f}{b['wall_seconds'] / 60:>16.1f}{'':>12}   "
          f"(b) <= {args.text_minutes:g}")
    print(f"quality goals met: {sum(met)} of {len(met)}")
    if args.json:
        args.json.write_text(json.dumps({"a": a, "b": b, "figures": figures, "step_ratio": ratio}, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
