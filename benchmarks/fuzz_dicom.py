"""Fuzzing the ingestion with malformed DICOM: crashes, hangs and unreported files.

    python benchmarks/fuzz_dicom.py [--files 10000] [--batch 500] [--data DICOM_DIR] [--work DIR]

Mutated copies of valid files (``cmr_search.synth.mutations``: truncation, header bit
flips, a wrong transfer syntax, zero and huge dimensions, missing pixel data, non-DICOM
content, and a folder that links to its parent) are written in batches; each batch goes
through ``cmr ingest --json`` in its own process, into a fresh store, with a time limit.
Counted per batch:

- a crash: the command ends with another exit code than 0 or 3, or without its JSON report;
- a hang: the time limit passes (``--timeout`` seconds a batch);
- an unreported file: found, but neither read nor named in a rejection or skip.

Goal (issue 22): 10,000 files with 0 crashes, 0 hangs and every rejected file named with a
reason. Without ``--data`` a 4-study synthetic cohort is generated as the source.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom


def account(report: dict, folder: Path) -> tuple[int, int]:
    """(files named in a file-level rejection or skip, files neither named nor readable).

    A file the report does not name must have been read: pydicom, the reference reader,
    is asked whether it can parse it; one it cannot parse was dropped without a word."""
    named = {r["where"] for r in report["rejected"] + report["skipped"]
             if not r["where"].startswith(("series ", "study "))}
    unreported = 0
    for path in folder.rglob("*.dcm"):
        if str(path) in named or not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any failure of the reference reader counts
            unreported += 1
            print(f"unreported: {path}", file=sys.stderr)
    return len(named), unreported


def run_batch(folder: Path, store: Path, timeout: float) -> dict:
    """One ``cmr ingest`` of a folder of mutated files; what became of them."""
    cmd = [sys.executable, "-m", "cmr_search.cli", "ingest", str(folder), "--store", str(store), "--json",
           "--workers", "2"]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"hang": 1, "crash": 0, "unreported": 0, "seconds": timeout}
    seconds = time.perf_counter() - started
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = None
    if done.returncode not in (0, 3) or report is None:
        print(f"crash (exit {done.returncode}): {done.stderr[-1500:]}", file=sys.stderr)
        return {"hang": 0, "crash": 1, "unreported": 0, "seconds": seconds}
    named, unreported = account(report, folder)
    return {"hang": 0, "crash": 0, "unreported": unreported, "seconds": seconds, "found": report["files_found"],
            "read": report["files_read"], "named": named, "rejected": len(report["rejected"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, help="valid DICOM to mutate (default: a generated 4-study cohort)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a batch may take before it is a hang")
    parser.add_argument("--json", type=Path, help="write the totals here")
    args = parser.parse_args()

    from cmr_search.synth import generate_cohort
    from cmr_search.synth.mutations import write_mutations

    work = args.work or Path(tempfile.mkdtemp(prefix="fuzz-dicom-"))
    data = args.data
    if data is None:
        data = work / "cohort"
        if not (data / "dicom").exists():
            generate_cohort(4, data, seed=args.seed, workers=2, progress=False)
        data = data / "dicom"
    sources = sorted(data.rglob("*.dcm"))
    totals = {"files": 0, "crash": 0, "hang": 0, "unreported": 0, "seconds": 0.0}
    for b, start in enumerate(range(0, args.files, args.batch)):
        n = min(args.batch, args.files - start)
        folder, store = work / f"batch-{b:04d}", work / f"store-{b:04d}"
        counts = write_mutations(sources, folder, n, seed=args.seed * 100_003 + b)
        result = run_batch(folder, store, args.timeout)
        totals["files"] += n
        for key in ("crash", "hang", "unreported", "seconds"):
            totals[key] += result[key]
        print(f"batch {b}: {n} files {dict(counts)} -> {json.dumps(result)}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    print(f"\n{totals['files']} mutated files: {totals['crash']} crashes, {totals['hang']} hangs, "
          f"{totals['unreported']} unreported files, {totals['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(totals, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
