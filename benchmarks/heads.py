"""How fast a head trains on cached embeddings: our batched MIL and linear heads against a
batch-size-1 loop (the paper's released code trains one study per step), side by side.

    python benchmarks/heads.py [--studies 35000] [--ref-minutes 10] [--json out.json]
    python benchmarks/heads.py --store DIR [--seeds 0 1 2]     # data-efficiency table, real embeddings

Data: synthetic embeddings shaped like the UK Biobank LVEF task (35,000 studies, 4-15
views each, 512-d; `evals.synth.embeddings`) whose LVEF is a known function of the views
plus 4 points of measurement noise (so no head can reach an MAE much under 3.2). One
patient-level split for all. Ours: `heads.train.fit_head` to its early-stopping point.
Reference: the same MIL head, one unpadded study per optimizer step (AdamW, lr 1e-4),
validated as often (in studies seen) with the same patience and minimum gain, capped at
--ref-minutes. Both times run to the early-stopping point; the reference's time to reach
our validation MAE is printed too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cmr_search.heads.config import HeadConfig
from cmr_search.heads.data import Bags, LabelSet, patient_split
from cmr_search.heads.model import build_head
from cmr_search.heads.train import EarlyStopping, fit_head, head_loss, predict_outputs
from cmr_search.metrics.prediction import regression_metrics
from cmr_search.synth.embeddings import embedding_cohort


def batch_size_one(bags: Bags, y: np.ndarray, split, cfg: HeadConfig, target_val_mae: float, minutes: float) -> dict:
    """The reference loop: one study per step, no padding, early stopping on validation."""
    train, val, test = split
    mean, std = y[train].mean(), y[train].std()
    z = torch.from_numpy(((y - mean) / std).astype(np.float32))[:, None]
    torch.manual_seed(cfg.seed)
    model = build_head(cfg, "regression", bags.studies.shape[1], 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=cfg.weight_decay)
    counts = bags.mask.sum(1).numpy()
    rng = np.random.default_rng(cfg.seed)
    started, deadline = time.perf_counter(), time.perf_counter() + 60 * minutes
    # validated as often as ours, counted in studies seen (ours: every check_every batches),
    # with the same patience and minimum gain
    every = cfg.check_every * cfg.batch_size
    early = EarlyStopping(cfg.patience, cfg.min_delta)
    matched_at, seen, history, stop = None, 0, [], False
    while not stop and time.perf_counter() < deadline:
        for i in rng.permutation(train):
            model.train()
            views = bags.views[i : i + 1, : counts[i]]
            out, _ = model(bags.studies[i : i + 1], views, torch.ones(1, counts[i], dtype=torch.bool))
            loss = head_loss("regression", out, z[i : i + 1], cfg.huber_delta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += 1
            if seen % every and time.perf_counter() < deadline:
                continue
            val_out = predict_outputs(model, bags, val)[0]
            val_loss = float(head_loss("regression", torch.from_numpy(val_out), z[val], cfg.huber_delta))
            val_mae = float(np.abs(val_out[:, 0] * std + mean - y[val]).mean())
            history.append({"studies_seen": seen, "seconds": time.perf_counter() - started, "val_mae": val_mae})
            print(f"  batch-size-1 after {seen} studies: val MAE {val_mae:.3f} at {history[-1]['seconds']:.0f} s",
                  flush=True)
            if matched_at is None and val_mae <= target_val_mae:
                matched_at = history[-1]["seconds"]
            stop = early.update(val_loss, model)
            if stop or time.perf_counter() >= deadline:
                break
    epochs = seen / len(train)
    model.load_state_dict(early.state)
    test_pred = predict_outputs(model, bags, test)[0][:, 0] * std + mean
    return {"seconds": time.perf_counter() - started, "epochs": epochs, "stopped_early": stop,
            "seconds_to_our_val_mae": matched_at, "best_val_loss": early.best,
            "test": regression_metrics(y[test], test_pred), "history": history}


def data_efficiency(store: Path, seeds: list[int], fractions=(0.01, 0.1, 1.0)) -> list[dict]:
    """Linear vs MIL at 1 %, 10 %, 100 % of the training labels, on a store's own
    embeddings (its latest encoder): LVEF MAE and the AUROC of each binary label present
    (one multi-label head), averaged over seeds (the split stays fixed)."""
    from cmr_search.heads.data import load_bags, load_labels
    from cmr_search.store.embedding_store import EmbeddingStore
    from cmr_search.store.search import default_model_id
    from cmr_search.synth.labels import BINARY_LABELS

    emb = EmbeddingStore.open(store)
    bags = load_bags(emb, default_model_id(emb))
    lvef = load_labels(emb, bags, ["lvef"])
    table = emb.clip_store.db.open_table("labels").to_arrow()
    present = [n for n in BINARY_LABELS if n in table.column_names]
    binary = load_labels(emb, bags, present, task="multilabel")
    rows = []
    for fraction in fractions:
        for kind in ("linear", "mil"):
            maes, aucs, n_train = [], {n: [] for n in present}, []
            for seed in seeds:
                r = fit_head(bags, lvef, HeadConfig(kind=kind, fraction=fraction, seed=seed))
                maes.append(r.metrics["test"]["lvef"]["mae"])
                n_train.append(r.split["train_studies"])
                c = fit_head(bags, binary, HeadConfig(kind=kind, fraction=fraction, seed=seed))
                for n in present:
                    auc = c.metrics["test"].get(n, {}).get("auroc")
                    if auc is not None and np.isfinite(auc):
                        aucs[n].append(auc)
            row = {"fraction": fraction, "kind": kind, "train_studies": float(np.mean(n_train)),
                   "lvef_mae": float(np.mean(maes)), "lvef_mae_sd": float(np.std(maes)),
                   "auroc": {n: float(np.mean(v)) for n, v in aucs.items() if v}}
            row["mean_auroc"] = float(np.mean(list(row["auroc"].values())))
            rows.append(row)
            print(f"{fraction:>6.0%} {kind:<6} train {row['train_studies']:5.0f}  LVEF MAE {row['lvef_mae']:.2f} "
                  f"± {row['lvef_mae_sd']:.2f}  mean AUROC {row['mean_auroc']:.3f}  "
                  + " ".join(f"{n} {a:.2f}" for n, a in row["auroc"].items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=35_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-minutes", type=float, default=15.0, help="cap of the batch-size-1 reference")
    parser.add_argument("--store", type=Path, help="data-efficiency table on this store's embeddings instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.store:
        rows = data_efficiency(args.store, args.seeds)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    t0 = time.perf_counter()
    cohort = embedding_cohort(args.studies, seed=args.seed, noise=4.0, lvef_noise=4.0)
    bags = Bags("synthetic", cohort.study_uids, cohort.patient_keys, torch.from_numpy(cohort.studies),
                torch.from_numpy(cohort.views), torch.from_numpy(cohort.mask), cohort.view_names)
    y = cohort.labels["lvef"].to_numpy().astype(np.float64)
    labels = LabelSet(["lvef"], y[:, None], "regression", "synthetic", "")
    views = cohort.mask.sum(1)
    print(f"{len(bags)} studies, {views.min()}-{views.max()} views (mean {views.mean():.1f}), "
          f"generated in {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}", flush=True)
    result: dict = {"studies": len(bags), "threads": torch.get_num_threads()}
    for kind in ("mil", "linear"):
        r = fit_head(bags, labels, HeadConfig(kind=kind))
        result[kind] = {"seconds": r.seconds, "epochs": r.epochs, "best_epoch": r.best_epoch,
                        "val": r.metrics["val"]["lvef"], "test": r.metrics["test"]["lvef"], "split": r.split}
        print(f"ours {kind:<6} {r.seconds:6.1f} s  {r.epochs} epochs (best {r.best_epoch})  "
              f"val MAE {r.metrics['val']['lvef']['mae']:.3f}  test MAE {r.metrics['test']['lvef']['mae']:.3f}", flush=True)
    cfg = HeadConfig(kind="mil")
    split = patient_split(bags, labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    ref = result["reference_bs1"] = batch_size_one(bags, y, split, cfg, result["mil"]["val"]["mae"], args.ref_minutes)
    ours = result["mil"]
    to_match = ref["seconds_to_our_val_mae"]
    print(f"\n{'':<28}{'seconds':>10}{'epochs':>8}{'test MAE':>10}")
    print(f"{'ours, MIL (batched)':<28}{ours['seconds']:>10.1f}{ours['epochs']:>8}{ours['test']['mae']:>10.3f}")
    lin = result["linear"]
    print(f"{'ours, linear':<28}{lin['seconds']:>10.1f}{lin['epochs']:>8}{lin['test']['mae']:>10.3f}")
    print(f"{'batch-size-1 MIL (reference)':<28}{ref['seconds']:>10.1f}{ref['epochs']:>8.1f}{ref['test']['mae']:>10.3f}"
          + ("" if ref["stopped_early"] else "  (capped)"))
    if to_match is not None:
        print(f"reference reached our validation MAE after {to_match:.0f} s: {to_match / ours['seconds']:.1f}x our time")
    else:
        print(f"reference never reached our validation MAE in {ref['seconds']:.0f} s: "
              f"more than {ref['seconds'] / ours['seconds']:.1f}x our time")
    result["speedup_to_early_stop"] = ref["seconds"] / ours["seconds"]
    result["speedup_to_same_quality"] = (to_match or ref["seconds"]) / ours["seconds"]
    print(f"to the early-stopping point: ours {ours['seconds']:.1f} s, reference {ref['seconds']:.0f} s "
          f"({result['speedup_to_early_stop']:.1f}x); test MAE {ours['test']['mae']:.3f} vs {ref['test']['mae']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
