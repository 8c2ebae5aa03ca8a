"""Ingest throughput against the floor of plain pydicom, measured side by side in one run.

The floor is what any reader of the same files must pay: ``pydicom.dcmread`` plus
``pixel_array`` on every file, in one process. The pipeline is ``indexer.ingest`` on the
same files (header pass, planning, pixel pass, clip resampling, Lance writes), first with
one worker (the per-core ratio) and then with more (the scaling).

    python benchmarks/ingest.py [--studies 20] [--data DIR] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import pydicom

from cmr_search.ingest.discover import discover

# Pool workers re-import this script (as multiprocessing does with __main__): importing
# lancedb here would load it into every worker, which the `cmr` command never does and
# which costs the workers about 20 % (measured). So the store is imported in functions.


def floor(paths: list[Path]) -> float:
    """Seconds for dcmread + pixel_array over every file, one process."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            _ = pydicom.dcmread(p).pixel_array
    return time.perf_counter() - t0


def pipeline(data: Path, workers: int) -> tuple[float, int, dict]:
    """Seconds for a full ingest into a fresh store, the clips written, seconds per stage."""
    from cmr_search.ingest import IngestConfig, ingest
    from cmr_search.store import ClipStore

    with tempfile.TemporaryDirectory() as tmp:
        store = ClipStore.open(Path(tmp) / "store", create=True)
        t0 = time.perf_counter()
        report = ingest([data], store, IngestConfig(workers=workers), b"bench", progress=False)
        return time.perf_counter() - t0, report.clips_inserted, report.phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--data", type=Path, help="a DICOM folder to use instead of a fresh cohort")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts (noisy machines)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from cmr_search.synth import generate_cohort

            generate_cohort(args.studies, Path(tmp) / "cohort", seed=1, progress=False)
            data = Path(tmp) / "cohort" / "dicom"
        files = [Path(r.path) for r in discover([data])]
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        # interleaved (floor, then each worker count, then again): a shared VM's speed drifts
        # over minutes, and the ratio must compare runs made under the same conditions
        floor_runs, pipeline_runs = [], {w: [] for w in args.workers}
        for _ in range(args.repeat):
            floor_runs.append(floor(files))
            for w in args.workers:
                pipeline_runs[w].append(pipeline(data, w))
        floor_s = min(floor_runs)
        rows = {"files": len(files), "MB": round(megabytes, 1), "floor_s": round(floor_s, 2),
                "floor_files_per_s": round(len(files) / floor_s, 1), "floor_MB_per_s": round(megabytes / floor_s, 1)}
        base = None
        for w in args.workers:
            seconds, clips, phases = min(pipeline_runs[w])
            base = base or seconds
            rows[f"w{w}"] = {
                "seconds": round(seconds, 2),
                "clips": clips,
                "clips_per_s": round(clips / seconds, 1),
                "MB_per_s": round(megabytes / seconds, 1),
                "ratio_to_floor": round(seconds / floor_s, 2),
                "speedup_vs_1_worker": round(base / seconds, 2),
                "phases_s": phases,
            }
    rows["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{rows['files']} files, {rows['MB']} MB ({rows['machine']})")
    print(f"floor  dcmread+pixel_array, 1 process: {rows['floor_s']:>7.2f} s  {rows['floor_files_per_s']:>7.1f} files/s  {rows['floor_MB_per_s']:>6.1f} MB/s")
    for w in args.workers:
        r = rows[f"w{w}"]
        print(f"ingest {w} worker(s): {r['seconds']:>7.2f} s  {r['clips_per_s']:>7.1f} clips/s  {r['MB_per_s']:>6.1f} MB/s"
              f"  ratio to floor {r['ratio_to_floor']:.2f}x  speedup {r['speedup_vs_1_worker']:.2f}x  stages {r['phases_s']}")


if __name__ == "__main__":
    main()
