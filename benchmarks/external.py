"""Does a model trained at one site work at another? The paper's internal-vs-external
comparison on synthetic sites (issue 24): the CPU recipe trained on an internal cohort,
its heads scored on the internal test split and on a cohort from a shifted site (the
generator's "external" profile: other vendors, 3 T, other frame counts and resolution,
another report style), plus view recognition at that site with and without descriptions.

    python benchmarks/external.py --store DIR [--external-studies 120] [--json out.json]
    python benchmarks/external.py --studies 300            # generate the internal cohort too

Figures (goals of issue 24 beside them):
- LVEF MAE external / internal (<= 1.5), mean disease AUROC external - internal (>= -0.05),
  own-report R@10 external - internal at one pool size (>= -0.1);
- view accuracy at the external site against the generator's truth, as exported and with
  every description and folder name removed (>= 0.99 each), and the share of its cines kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

GOALS = {"lvef_mae_ratio": ("<=", 1.5), "mean_auroc_difference": (">=", -0.05),
         "r10_difference_common_pool": (">=", -0.1), "views_external": (">=", 0.99),
         "views_external_blank": (">=", 0.99)}


def ingest_site(cohort: Path, root: Path, site: str, tables: bool = True) -> Path:
    """Ingest a generated cohort into a new store (with its reports and labels)."""
    from cmr_search.ingest import IngestConfig
    from cmr_search.ingest.pipeline import ingest_into

    ingest_into([cohort / "dicom"], root, IngestConfig(workers=2, site=site), "bench",
                reports=cohort / "reports.csv" if tables else None, labels=cohort / "labels.csv" if tables else None,
                progress=True)
    return root


def view_accuracy(store_root: Path, truth_csv: Path) -> dict:
    """Stored clips whose view matches the generator's truth, and the share of true cines kept."""
    from cmr_search.store import ClipStore

    with open(truth_csv) as fp:
        truth = {r["series_uid"]: r["view"] for r in csv.DictReader(fp) if r["kind"] == "cine" and r["superseded"] == "0"}
    clips = ClipStore.open(store_root).clip_metadata(["series_uid", "view"]).to_pylist()
    scored = [c for c in clips if c["series_uid"] in truth]
    right = sum(c["view"] == truth[c["series_uid"]] for c in scored)
    kept = len({c["series_uid"] for c in scored})
    wrong: dict[str, int] = {}
    for c in scored:
        if c["view"] != truth[c["series_uid"]]:
            key = f"{truth[c['series_uid']]}->{c['view']}"
            wrong[key] = wrong.get(key, 0) + 1
    return {"accuracy": right / len(scored) if scored else float("nan"), "clips": len(scored),
            "cines_kept": kept / len(truth) if truth else float("nan"), "confusions": wrong}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an ingested internal store with reports and labels")
    parser.add_argument("--studies", type=int, default=300, help="internal cohort size when no --store is given")
    parser.add_argument("--external-studies", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0, help="the encoder's training seed")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="the CPU recipe's training budget")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.embed import TextQueryEncoder, embed_store
    from cmr_search.encoder.train import Trainer
    from cmr_search.evals.config import EvalConfig
    from cmr_search.evals.external import external_validation
    from cmr_search.synth import generate_cohort
    from cmr_search.synth.variants import strip_view_names

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.store:  # train in a copy: the benchmark leaves the user's store as it was
            internal = Path(shutil.copytree(args.store, work / "internal" / "store"))
        else:
            generate_cohort(args.studies, work / "internal_cohort", seed=11, workers=2)
            internal = ingest_site(work / "internal_cohort", work / "internal" / "store", "internal")
        t0 = time.perf_counter()
        generate_cohort(args.external_studies, work / "external_cohort", seed=101, workers=2, site="external")
        external = ingest_site(work / "external_cohort", work / "external" / "store", "external")
        blank = work / "blank"  # the same studies as an anonymising export writes them
        strip_view_names(work / "external_cohort" / "dicom", blank / "dicom")
        blank_store = ingest_site(blank, work / "external_blank" / "store", "external", tables=False)
        out["external_site_seconds"] = time.perf_counter() - t0
        truth = work / "external_cohort" / "truth.csv"
        out["views_external"] = view_accuracy(external, truth)
        out["views_external_blank"] = view_accuracy(blank_store, truth)

        cfg = load_config("mvit_xs_cpu")
        trainer = Trainer(internal, cfg, run_dir=work / "run", log=print)
        result = trainer.fit(max_minutes=args.max_minutes)
        out["train"] = {"model_id": result.model_id, "steps": result.step, "minutes": result.seconds / 60}
        embed_store(internal, result.checkpoint)
        table = external_validation(internal, [external], result.model_id, EvalConfig(), TextQueryEncoder(internal))
        out["external"] = table
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    sys.stdout.flush()


def report(out: dict) -> None:
    """Internal beside external, the gaps and the goals."""
    sites = out["external"]["sites"]
    print(f"\ntrained {out['train']['steps']} steps in {out['train']['minutes']:.1f} min")
    print(f"{'figure':<34}{'internal test':>16}{'external':>16}")
    internal, external = sites["internal"], sites["external"]
    rows = [("studies", internal["lvef"]["n"], external["lvef"]["n"]),
            ("LVEF MAE", internal["lvef"]["mae"], external["lvef"]["mae"]),
            ("LVEF SD of |error|", internal["lvef"]["abs_error_sd"], external["lvef"]["abs_error_sd"]),
            ("LVEF bias", internal["lvef"]["bias"], external["lvef"]["bias"]),
            ("HFrEF AUROC", internal["lvef"].get("hfref", {}).get("auroc"), external["lvef"].get("hfref", {}).get("auroc")),
            ("mean disease AUROC", internal.get("mean_auroc"), external.get("mean_auroc")),
            (f"own-report R@10, pools of {external['retrieval']['common_pool']}",
             internal["retrieval"]["common_R@10"], external["retrieval"]["common_R@10"])]
    for name, a, b in rows:
        print(f"{name:<34}{_f(a):>16}{_f(b):>16}")
    gap = external["gap"]
    figures = {**gap, "views_external": out["views_external"]["accuracy"],
               "views_external_blank": out["views_external_blank"]["accuracy"]}
    print()
    for key, (op, goal) in GOALS.items():
        v = figures.get(key)
        ok = v is not None and (v <= goal if op == "<=" else v >= goal)
        print(f"{key:<34}{_f(v):>16}   goal {op} {goal}   {'met' if ok else 'NOT met'}")
    for name in ("views_external", "views_external_blank"):
        v = out[name]
        print(f"{name}: {v['clips']} clips, cines kept {v['cines_kept']:.3f}, confusions {v['confusions']}")


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


if __name__ == "__main__":
    main()
