"""DeLong statistics against R's pROC, side by side: for paired scores of n studies, the time
of both AUROCs with their DeLong intervals and the paired DeLong test (ours: `evals.stats`;
pROC: `roc`, `ci.auc(method="delong")`, `roc.test(method="delong", paired=TRUE)`, timed inside
R so that R's start-up and the CSV read are not counted), and the largest difference of
their results.

    python benchmarks/stats.py [--sizes 1215 10000 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from cmr_search.metrics.stats import auroc_ci, delong_test

R_TIMED = r"""
suppressPackageStartupMessages(library(pROC))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1]); repeats <- as.integer(args[2])
run <- function() {
  ra <- roc(d$label, d$a, levels = c(0, 1), direction = "<", quiet = TRUE)
  rb <- roc(d$label, d$b, levels = c(0, 1), direction = "<", quiet = TRUE)
  ca <- as.numeric(ci.auc(ra, method = "delong")); cb <- as.numeric(ci.auc(rb, method = "delong"))
  p <- roc.test(ra, rb, method = "delong", paired = TRUE)$p.value
  c(ca[2], ca[1], ca[3], cb[2], cb[1], cb[3], p)
}
out <- run()
times <- sapply(seq_len(repeats), function(i) system.time(run())[["elapsed"]])
cat(sprintf("%.17g", c(median(times), out)), sep = "\n")
"""


def ours(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> list[float]:
    """Both AUROCs with their intervals and the paired p-value."""
    return [*auroc_ci(labels, a), *auroc_ci(labels, b), delong_test(labels, a, b)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1215, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise SystemExit("needs Rscript with pROC (Debian: r-base-core r-cran-proc)")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "timed.R"
        script.write_text(R_TIMED)
        for n in args.sizes:
            labels = (rng.random(n) < 0.1).astype(int)
            a = np.round(labels * 0.8 + rng.normal(0, 1, n), 3)  # rounded: ties, as real probabilities have
            b = np.round(labels * 0.5 + 0.6 * a + rng.normal(0, 1, n), 3)
            data = Path(tmp) / f"n{n}.csv"
            with open(data, "w", newline="") as fp:
                writer = csv.writer(fp)
                writer.writerow(["label", "a", "b"])
                writer.writerows(zip(labels, a.tolist(), b.tolist()))
            done = subprocess.run([rscript, str(script), str(data), str(args.repeat)], capture_output=True, text=True,
                                  check=True)
            r_values = [float(v) for v in done.stdout.split()]
            r_seconds, r_result = r_values[0], r_values[1:]
            ours(labels, a, b)  # warm-up
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                result = ours(labels, a, b)
                times.append(time.perf_counter() - started)
            seconds = float(np.median(times))
            diff = float(np.max(np.abs(np.array(result) - np.array(r_result))))
            rows.append({"n": n, "cases": int(labels.sum()), "ours_ms": seconds * 1e3, "proc_ms": r_seconds * 1e3,
                         "speedup": r_seconds / seconds if seconds else float("inf"), "max_abs_diff": diff})
    print(f"{'n':>8} {'cases':>7} {'ours ms':>10} {'pROC ms':>10} {'pROC/ours':>10} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['n']:>8} {r['cases']:>7} {r['ours_ms']:>10.2f} {r['proc_ms']:>10.1f} {r['speedup']:>9.1f}x "
              f"{r['max_abs_diff']:>11.1e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
