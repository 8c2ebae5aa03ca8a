"""The cluster path against the process pool on one machine (issue 27), in one run:

- ``cmr ingest --ray`` on a local Ray cluster against today's process-pool ingest of the same
  cohort, interleaved, fastest of ``--repeat`` each, as a ratio (goal: within 1.25x on one
  node); Ray's own start is timed apart (a cluster outlives one ingest);
- 1 against 2 workers for both (the pool's ``--workers``, the cluster's CPUs);
- ``cmr embed --ray`` (a pool of CPU encoder actors) against the single-machine embed of the
  same store with the same model (``--embed-config``, a 1-step checkpoint: speed does not
  depend on the weights), clips/s, 1 and 2 actors;
- the per-study costs behind the 100k-study estimate of docs/ARCHITECTURE.md: seconds of
  CPU per study for the ingest, bytes of DICOM read and of clips written per study.

    python benchmarks/scale.py [--studies 20] [--repeat 2] [--embed-config mvit_xs_cpu]
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


def embed_runs(data: Path, work: Path, config: str, repeat: int) -> None:
    """Single-machine against Ray embedding of one ingested store, 1 and 2 actors."""
    import ray

    from cmr_search.encoder import embed_store
    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.train import Trainer
    from cmr_search.ingest import IngestConfig, ingest
    from cmr_search.store import ClipStore

    source = work / "embed-source"
    store = ClipStore.open(source, create=True)
    ingest([data], store, IngestConfig(workers=2), b"bench", reports=data.parent / "reports.csv", progress=False)
    checkpoint = Trainer(source, load_config(config), run_dir=work / "run", progress=False,
                         log=lambda *_: None).fit(max_steps=1).checkpoint

    def once(ray_address: str | None) -> tuple[float, int]:
        root = work / f"embed-{time.monotonic_ns()}"
        shutil.copytree(source, root)
        shutil.rmtree(root / "encoders", ignore_errors=True)
        t0 = time.perf_counter()
        report = embed_store(root, checkpoint, progress=False, ray=ray_address)
        seconds = time.perf_counter() - t0
        shutil.rmtree(root)
        return seconds, report.clips_embedded

    for actors in (2, 1):
        ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            here, there = [], []
            for _ in range(repeat):
                here.append(once(None))
                there.append(once("auto"))
        finally:
            ray.shutdown()
        (a, clips), (b, _) = min(here), min(there)
        print(f"embed ({config}), {clips} clips: this machine {a:.1f} s ({clips / a:.1f} clips/s), Ray with "
              f"{actors} CPU actor(s) {b:.1f} s ({clips / b:.1f} clips/s); ratio {b / a:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--embed-config", default="mvit_xs_cpu", help="encoder config of the embedding runs")
    parser.add_argument("--skip-embed", action="store_true")
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
        _, cpu, report = results[2][1]
        studies = report.studies_written
        print(f"per study (Ray, 2 workers): {cpu / studies:.2f} CPU-s, {size / args.studies / 1e6:.1f} MB of DICOM "
              f"read, {report.clip_bytes / studies / 1e6:.1f} MB of clips written, "
              f"{sum(report.views.values()) / studies:.1f} clips", flush=True)
        if not args.skip_embed:
            embed_runs(data, work, args.embed_config, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
