"""The cluster path against the process pool on one machine (issue 27), in one run:

- ``cmr ingest --ray`` on a local Ray cluster against today's process-pool ingest of the same
  cohort, interleaved, fastest of ``--repeat`` each, as a ratio (goal: within 1.25x on one
  node); Ray's own start is timed apart (a cluster outlives one ingest);
- 1 against 2 workers for both (the pool's ``--workers``, the cluster's CPUs);
- the per-study costs behind the 100k-study estimate of docs/ARCHITECTURE.md: seconds of
  CPU per study for the ingest, bytes of DICOM read and of clips written per study.

    python benchmarks/scale.py [--studies 20] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a cluster of this machine only


def cohort(n: int, out: Path) -> tuple[Path, int, int]:
    """A synthetic cohort of ``n`` studies: its DICOM folder, files and bytes."""
    from cmr_search.synth import generate_cohort

    generate_cohort(n, out, seed=11, workers=2, progress=False)
    files = list((out / "dicom").rglob("*.dcm"))
    return out / "dicom", len(files), sum(p.stat().st_size for p in files)


def busy() -> float:
    """CPU-seconds the whole machine has spent busy (every process, Ray's included)."""
    with open("/proc/stat") as fp:
        f = [int(x) for x in fp.readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def run(data: Path, work: Path, workers: int, ray: str | None) -> tuple[float, float, object]:
    """(seconds, machine CPU-seconds, report) of one ingest into a fresh store."""
    from cmr_search.ingest import IngestConfig, ingest
    from cmr_search.store import ClipStore

    root = work / f"store-{time.monotonic_ns()}"
    store = ClipStore.open(root, create=True)
    cpu, t0 = busy(), time.perf_counter()
    report = ingest([data], store, IngestConfig(workers=workers, ray=ray), b"bench", progress=False)
    seconds, cpu = time.perf_counter() - t0, busy() - cpu
    clip_bytes = sum(p.stat().st_size for p in (root / "lance" / "clips.lance").rglob("*") if p.is_file())
    shutil.rmtree(root)
    report.clip_bytes = clip_bytes
    return seconds, cpu, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="cmr-scale-"))
    try:
        data, n_files, size = cohort(args.studies, work / "cohort")
        print(f"cohort: {args.studies} studies, {n_files:,} files, {size / 1e6:.0f} MB; {os.cpu_count()} cores", flush=True)
        results = {}
        for workers in (2, 1):
            t0 = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            start = time.perf_counter() - t0
            pool, cluster = [], []
            try:
                for _ in range(args.repeat):  # interleaved: the machine's speed drifts
                    pool.append(run(data, work, workers, None))
                    cluster.append(run(data, work, workers, "auto"))
            finally:
                ray.shutdown()
            best_pool, best_ray = min(pool, key=lambda r: r[0]), min(cluster, key=lambda r: r[0])
            results[workers] = best_pool, best_ray
            print(f"{workers} worker(s): process pool {best_pool[0]:.2f} s ({best_pool[1]:.1f} CPU-s), Ray "
                  f"{best_ray[0]:.2f} s ({best_ray[1]:.1f} CPU-s; Ray's start {start:.1f} s apart); "
                  f"ratio {best_ray[0] / best_pool[0]:.2f} (goal <= 1.25)", flush=True)
        for name, i in (("process pool", 0), ("Ray", 1)):
            print(f"{name}: 1 -> 2 workers {results[1][i][0] / results[2][i][0]:.2f}x faster", flush=True)
        seconds, cpu, report = results[2][1]
        studies = report.studies_written
        print(f"per study (Ray, 2 workers): {cpu / studies:.2f} CPU-s, {size / args.studies / 1e6:.1f} MB of DICOM "
              f"read, {report.clip_bytes / studies / 1e6:.1f} MB of clips written, "
              f"{sum(report.views.values()) / studies:.1f} clips", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
