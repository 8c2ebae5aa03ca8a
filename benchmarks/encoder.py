"""Does contrastive pre-training learn? The CPU configuration trained for a fixed budget
against the same architecture with random weights (the paper's baseline idea), side by side
on held-out studies, over several seeds.

    python benchmarks/encoder.py --store DIR [--steps 200] [--seeds 0 1 2] [--json out.json]
    python benchmarks/encoder.py --studies 240     # synthesise and ingest a cohort first

Figures (held-out patients only, never trained on): text-to-study Recall@1/5/10 with each
study's own report as the query; a linear probe (ridge) of LVEF from frozen study
embeddings (MAE); logistic probes of the phenotype labels (mean AUROC); view invariance
(how often a view's nearest study embedding is its own study); embedding throughput.
Every training seed is scored on the same held-out patients (``--split-seed``), so the
spread over seeds is that of training and initialisation, not of which patients were held out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

PHENOTYPES = ["lv_dilatation", "reduced_lvef", "hcm", "concentric_lvh", "dcm", "lv_thrombus", "apical_akinesis",
              "rv_dilatation", "rv_dysfunction", "la_dilatation", "ra_dilatation", "pericardial_effusion"]


def make_store(studies: int, seed: int, root: Path) -> Path:
    """Synthesise a cohort and ingest it (imports inside: ingest workers re-import this script)."""
    from cmr_search.ingest import IngestConfig, ingest
    from cmr_search.store import ClipStore
    from cmr_search.synth import generate_cohort

    generate_cohort(studies, root / "cohort", seed=seed, workers=2, progress=True)
    store = ClipStore.open(root / "store", create=True)
    ingest([root / "cohort" / "dicom"], store, IngestConfig(workers=2), b"bench",
           reports=root / "cohort" / "reports.csv", labels=root / "cohort" / "labels.csv", progress=True)
    return root / "store"


def evaluate(model, corpus, train, test, labels: dict, device) -> dict:
    """Every figure for one model on one split."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from cmr_search.encoder.align import embed_studies
    from cmr_search.metrics.retrieval import retrieval_summary

    model.eval()
    t0 = time.perf_counter()
    test_views, test_emb = embed_studies(model, corpus, test, device)
    n_clips = sum(len(v) for v in test_views)
    clips_per_s = n_clips / (time.perf_counter() - t0)
    _, train_emb = embed_studies(model, corpus, train, device)
    with torch.inference_mode():
        reports = model.text.encode([s.report for s in test]).float()
    out = {k: v for k, v in retrieval_summary((reports @ test_emb.t()).numpy(), np.arange(len(test))).items()}
    # view invariance: each held-out view against all held-out study embeddings
    owner = np.concatenate([[i] * len(v) for i, v in enumerate(test_views)])
    nearest = (torch.cat(test_views) @ test_emb.t()).argmax(1).numpy()
    out["view_own_study"] = float(np.mean(nearest == owner))
    out["clips_per_s"] = clips_per_s
    # linear probes on frozen study embeddings
    xtr, xte = train_emb.numpy(), test_emb.numpy()
    scaler = StandardScaler().fit(xtr)
    xtr, xte = scaler.transform(xtr), scaler.transform(xte)

    def col(studies, name):
        return np.array([float(labels[s.study_uid][name]) for s in studies])

    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(xtr, col(train, "lvef"))
    out["lvef_MAE"] = float(np.mean(np.abs(ridge.predict(xte) - col(test, "lvef"))))
    aucs = {}
    for name in PHENOTYPES:
        ytr, yte = col(train, name), col(test, name)
        if ytr.sum() >= 3 and 0 < yte.sum() < len(yte):
            clf = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced").fit(xtr, ytr)
            aucs[name] = float(roc_auc_score(yte, clf.decision_function(xte)))
    out["mean_AUROC"] = float(np.mean(list(aucs.values())))
    out["AUROC"] = aucs
    return out


def train_split(store: Path, cfg, seed: int, split_seed: int | None, steps: int, run_dir: Path):
    """Train ``cfg`` at ``seed`` for ``steps`` with a quarter of the patients held out
    -> (trainer, result, labels by study_uid, labelled train studies, labelled held-out studies)."""
    from cmr_search.encoder.train import Trainer

    cfg.train = replace(cfg.train, seed=seed, split_seed=split_seed, max_steps=steps, val_fraction=0.25,
                        eval_every=max(50, steps // 4), checkpoint_every=max(50, steps // 4))
    trainer = Trainer(store, cfg, run_dir=run_dir, device="cpu", progress=True, log=print)
    result = trainer.fit()
    labels = labels_of(store)
    train = [s for s in trainer.train_studies if s.study_uid in labels]
    test = [s for s in trainer.val_studies if s.study_uid in labels]
    return trainer, result, labels, train, test


def run_seed(store: Path, seed: int, steps: int, config: str, work: Path, split_seed: int | None = 0) -> dict:
    """Train one seed and score it against the same architecture at random init."""
    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.model import CmrClip

    cfg = load_config(config)
    trainer, result, labels, train, test = train_split(store, cfg, seed, split_seed, steps, work / f"run-{seed}")
    trained = evaluate(trainer.model, trainer.corpus, train, test, labels, trainer.device)
    torch.manual_seed(seed)
    random_model = CmrClip(cfg)
    baseline = evaluate(random_model, trainer.corpus, train, test, labels, trainer.device)
    return {"seed": seed, "steps": result.step, "train_minutes": result.seconds / 60, "held_out": len(test),
            "train_studies": len(train), "contrastive": trained, "random": baseline}


def throughput(configs: list[str], batch: int, repeats: int) -> list[dict]:
    """Embedding clips/s of each configuration's vision tower (inference mode; bf16 on CUDA)
    and the time for one study of 14 clips (3 long-axis views + 11 SAX slices)."""
    from contextlib import nullcontext

    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.video import VideoEncoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for name in configs:
        cfg = load_config(name)
        model = VideoEncoder(cfg.vision).to(device).eval()
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        x = torch.randn(batch, 3, cfg.vision.frames, cfg.vision.crop_size, cfg.vision.crop_size, device=device)
        study = torch.randn(14, *x.shape[1:], device=device)
        with torch.inference_mode(), amp:
            model(x)  # warm-up
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                model(x)
            sync()
            per_clip = (time.perf_counter() - t0) / (repeats * batch)
            t0 = time.perf_counter()
            model(study)
            sync()
            per_study = time.perf_counter() - t0
        out.append({"config": name, "device": str(device), "batch": batch, "clips_per_s": 1 / per_clip,
                    "ms_per_study_14_clips": 1000 * per_study,
                    "params_M": sum(p.numel() for p in model.parameters()) / 1e6})
    return out


def labels_of(store: Path) -> dict:
    """The store's labels table by study_uid."""
    from cmr_search.store import ClipStore

    rows = ClipStore.open(store).db.open_table("labels").to_arrow().to_pylist()
    return {r["study_uid"]: r for r in rows}


def summarise(runs: list[dict]) -> list[tuple]:
    """Rows: metric, contrastive mean ± sd, random mean ± sd, whether the gap beats the spread."""
    rows = []
    for key, higher in [("R@1", True), ("R@5", True), ("R@10", True), ("median_rank", False), ("lvef_MAE", False),
                        ("mean_AUROC", True), ("view_own_study", True), ("clips_per_s", True)]:
        a = np.array([r["contrastive"][key] for r in runs])
        b = np.array([r["random"][key] for r in runs])
        gap = (a.mean() - b.mean()) * (1 if higher else -1)
        # sample standard deviations (n - 1): with 3 seeds the population form is 18 % smaller
        sd_a, sd_b = a.std(ddof=1) if len(a) > 1 else 0.0, b.std(ddof=1) if len(b) > 1 else 0.0
        rows.append((key, a.mean(), sd_a, b.mean(), sd_b, gap > max(sd_a, sd_b)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an ingested store with reports and labels")
    parser.add_argument("--studies", type=int, default=240, help="cohort size when no --store is given")
    parser.add_argument("--steps", type=int, default=600, help="training steps per seed (the fixed budget: the CPU config's max_steps, about 10 minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="mvit_xs_cpu")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the held-out patients, the same for every training seed (-1: each seed its own split)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--throughput", action="store_true", help="only measure embedding throughput")
    parser.add_argument("--batch", type=int, default=8, help="clips per forward for --throughput")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.throughput:
        for row in throughput(["mvit_xs_cpu", "mvit_b_16x4"], args.batch, args.repeats):
            print(f"{row['config']:<14} {row['device']:<5} {row['params_M']:6.1f}M params  "
                  f"{row['clips_per_s']:8.1f} clips/s  {row['ms_per_study_14_clips']:9.1f} ms per 14-clip study")
        return
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = args.store or make_store(args.studies, 11, work)
        if args.store:  # train in a copy: the benchmark must not leave runs in the user's store
            store = Path(shutil.copytree(args.store, work / "store"))
        split_seed = None if args.split_seed < 0 else args.split_seed
        runs = [run_seed(store, seed, args.steps, args.config, work, split_seed) for seed in args.seeds]
    print(f"\n{args.config}: {runs[0]['steps']} steps/seed, {np.mean([r['train_minutes'] for r in runs]):.1f} min/seed "
          f"on {torch.get_num_threads()} threads; held-out studies {[r['held_out'] for r in runs]} "
          f"(train {[r['train_studies'] for r in runs]}); seeds {args.seeds}")
    print(f"{'metric':<16}{'contrastive':>18}{'random init':>18}  ahead by more than the spread")
    for key, am, asd, bm, bsd, ok in summarise(runs):
        print(f"{key:<16}{am:>11.3f} ± {asd:<5.3f}{bm:>11.3f} ± {bsd:<5.3f}  {'yes' if ok else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "runs": runs}, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
