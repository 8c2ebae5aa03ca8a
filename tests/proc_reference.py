"""pROC reference values for the statistics tests: builds the test cases, runs
``proc_reference.R`` on them, and (run as ``python tests/proc_reference.py``) rewrites
``metrics/data/proc_reference.json``, which the tests read when R is not installed."""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent / "metrics"
R_SCRIPT = HERE / "proc_reference.R"
REFERENCE_JSON = HERE / "data" / "proc_reference.json"
# the seed paper's prediction files sit beside the checkout (../shared/reference); CMR_REFERENCE_DIR overrides
SEED_DIR = Path(os.environ.get("CMR_REFERENCE_DIR")
                or Path(__file__).resolve().parents[2] / "shared" / "reference" / "cmr_transformer")
RESULT_KEYS = ("auc_a", "lower_a", "upper_a", "auc_b", "lower_b", "upper_b", "p_paired",
               "p_unpaired", "t_unpaired", "df_unpaired", "p_auto")


@functools.cache
def rscript() -> str | None:
    """The Rscript that can load pROC, or None."""
    exe = shutil.which("Rscript")
    if exe is None:
        return None
    ok = subprocess.run([exe, "-e", "library(pROC)"], capture_output=True, check=False).returncode == 0
    return exe if ok else None


def proc_version() -> str:
    out = subprocess.run([rscript(), "-e", 'cat(as.character(packageVersion("pROC")))'],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def case(labels, scores_a, scores_b=None, labels_b=None, dir_a="<", dir_b="<",
         level=0.95) -> dict:
    """One test case: labels with one or two scores (``labels_b`` for unpaired curves)."""
    labels = [int(v) for v in labels]
    return {"labels": labels, "scores_a": [float(v) for v in scores_a],
            "scores_b": None if scores_b is None else [float(v) for v in scores_b],
            "labels_b": labels if labels_b is None else [int(v) for v in labels_b],
            "dir_a": dir_a, "dir_b": dir_b, "level": level}


def run_proc(cases: dict[str, dict]) -> dict[str, dict]:
    """pROC's AUROC, DeLong limits and tests for each case (see proc_reference.R)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "cases.csv", Path(tmp) / "results.csv"
        with open(src, "w", newline="") as fp:
            w = csv.writer(fp)
            w.writerow(["case", "level", "dir_a", "dir_b", "label_a", "score_a", "label_b",
                        "score_b"])
            for name, c in cases.items():
                n, nb = len(c["labels"]), len(c["labels_b"])
                sb = c["scores_b"] or []
                for k in range(max(n, nb)):
                    w.writerow([name, c["level"], c["dir_a"], c["dir_b"],
                                c["labels"][k] if k < n else "NA",
                                repr(c["scores_a"][k]) if k < n else "NA",
                                c["labels_b"][k] if k < nb and sb else "NA",
                                repr(sb[k]) if k < len(sb) else "NA"])
        subprocess.run([rscript(), str(R_SCRIPT), str(src), str(dst)], check=True,
                       capture_output=True)
        with open(dst, newline="") as fp:
            rows = list(csv.DictReader(fp))
    out = {}
    for r in rows:
        res = {k: (float(r[k]) if r[k] not in ("NA", "") else None) for k in RESULT_KEYS}
        res |= {"direction_a": r["direction_a"], "direction_b": r["direction_b"] or None,
                "auto_method": r["auto_method"] or None}
        out[r["case"]] = res
    return out


def asah() -> dict[str, list]:
    """pROC's aSAH data set: outcome (1 = Poor) and the s100b, ndka and wfns predictors."""
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "asah.csv"
        subprocess.run([rscript(), str(R_SCRIPT), "--asah", str(dst)], check=True,
                       capture_output=True)
        with open(dst, newline="") as fp:
            rows = list(csv.DictReader(fp))
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def stats_cases(asah_data: dict[str, list]) -> dict[str, dict]:
    """aSAH and random cases (fixed seeds, some tied, several sizes, some flipped)."""
    y = asah_data["outcome"]
    cases = {
        "asah/s100b_ndka": case(y, asah_data["s100b"], asah_data["ndka"]),
        "asah/s100b_wfns": case(y, asah_data["s100b"], asah_data["wfns"]),
        "asah/wfns_ndka_90": case(y, asah_data["wfns"], asah_data["ndka"], level=0.9),
        "asah/ndka_auto": case(y, asah_data["ndka"], asah_data["s100b"], dir_a="auto",
                               dir_b="auto"),
    }
    for seed, n, prevalence, tie_grid in [(0, 12, 0.5, None), (1, 40, 0.3, 5), (2, 150, 0.1, None),
                                          (3, 400, 0.2, 20), (4, 1000, 0.05, None),
                                          (5, 60, 0.5, 3)]:
        rng = np.random.default_rng(seed)
        labels = (rng.random(n) < prevalence).astype(int)
        labels[:2] = (0, 1)  # both classes, at least two of each for the paired test
        labels[2:4] = (0, 1)
        a = rng.normal(size=n) + 0.8 * labels
        b = 0.6 * a + rng.normal(size=n) + 0.3 * labels
        if tie_grid:
            a, b = np.round(a * tie_grid / 4) / tie_grid, np.round(b * tie_grid / 4) / tie_grid
        cases[f"random/seed{seed}_n{n}"] = case(labels, a, b)
        if seed in (1, 2):  # a score worse than chance, with pROC's automatic direction
            cases[f"random/seed{seed}_n{n}_auto"] = case(labels, -a, b, dir_a="auto",
                                                         dir_b="auto")
        if seed in (3, 5):  # unpaired: the second curve on other studies
            m = n // 2 + 3
            lb = (rng.random(m) < 0.4).astype(int)
            lb[:4] = (0, 1, 0, 1)
            cases[f"random/seed{seed}_unpaired"] = case(labels, a, rng.normal(size=m) + lb,
                                                        labels_b=lb)
    return cases


def seed_cases(reference_dir: Path = SEED_DIR) -> dict[str, dict]:
    """For each label of the seed paper: our analysis (each study once, paired by id, "<") and
    the authors' (the files' rows as they stand, pROC's automatic direction); HFrEF from the
    LVEF predictions."""
    from cmr_search.evals.reference import LVEF_FILES, MODELS, paired, read_predictions

    folder = reference_dir / "classification_internal_test"
    cases = {}
    for path in sorted((folder / MODELS[0]).glob("*.table.json")):
        label = path.name.removesuffix(".table.json")
        a = read_predictions(path).complete()
        b = read_predictions(folder / MODELS[1] / path.name).complete()
        p = paired(a, b)
        cases[f"seed/{label}/ours"] = case(p.labels, p.scores_a, p.scores_b)
        cases[f"seed/{label}/file_rows_auto"] = case(a.labels, a.scores, b.scores,
                                                     labels_b=b.labels, dir_a="auto",
                                                     dir_b="auto")
    for cohort, stem in LVEF_FILES.items():
        lvef = [read_predictions(reference_dir / "lvef_regression" / f"{stem}_{m}.table.json")
                for m in MODELS]
        p = paired(*lvef)
        hf = (p.labels < 40).astype(int)
        cases[f"lvef/{cohort}/hfref"] = case(hf, -p.scores_a, -p.scores_b)
    return cases


def main() -> None:
    if rscript() is None:
        raise SystemExit("Rscript with pROC is needed: apt-get install r-base-core r-cran-proc")
    asah_data = asah()
    stats = stats_cases(asah_data)
    seed = seed_cases() if SEED_DIR.is_dir() else {}
    results = run_proc(stats | seed)
    doc = {"proc_version": proc_version(), "asah": asah_data,
           "stats": {k: {"inputs": c, "proc": results[k]} for k, c in stats.items()},
           "seed_paper": {k: results[k] for k in seed}}
    REFERENCE_JSON.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_JSON.write_text(json.dumps(doc, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {len(stats)} + {len(seed)} cases to {REFERENCE_JSON}")


if __name__ == "__main__":
    main()
