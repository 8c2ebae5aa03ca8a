"""The hospital archive as a source, measured against a local Orthanc (issue 26), in one run:

- pull throughput: ``cmr ingest --dicomweb`` of a cohort from Orthanc against ingesting the
  same files from disk, interleaved, the fastest of ``--repeat`` each, as a ratio (goal:
  within 1.5x of the disk path);
- the disk working set during a pull of ``--working-set-studies`` studies (the largest size
  of the pull's scratch, sampled every 20 ms) against the cohort's own size;
- arrival to searchable: a ``cmr sync`` loop (``--every`` seconds) over a store with an
  encoder; a study is uploaded to Orthanc at a random moment of the cycle and the time until
  the store's index answers for it is taken, beside that cycle's own ingest and embed time
  (goal: under one sync period plus the study's own ingest and embed time).

    python benchmarks/pacs.py [--studies 20] [--working-set-studies 100] [--every 10]

Needs Orthanc and its DICOMweb plugin (Debian: orthanc, orthanc-dicomweb).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's Orthanc launcher

from orthanc import remove, start_orthanc


def cohort(n: int, seed: int, out: Path) -> tuple[Path, list[Path], int]:
    """A synthetic cohort of ``n`` studies: its DICOM folder, its files and their bytes."""
    from cmr_search.synth import generate_cohort

    generate_cohort(n, out, seed=seed, workers=2, progress=False)
    files = sorted((out / "dicom").rglob("*.dcm"))
    return out / "dicom", files, sum(p.stat().st_size for p in files)


def source(server):
    """A DICOMweb source for the server (basic auth)."""
    from pydantic import SecretStr

    from cmr_search.ingest.dicomweb import DicomWebSource

    user, password = server.auth
    return DicomWebSource(server.dicomweb, username=user, password=SecretStr(password), password_env="PACS_PW")


def disk_ingest(data: Path, work: Path, workers: int) -> float:
    """Seconds to ingest the files into a fresh store."""
    from cmr_search.ingest import IngestConfig, ingest
    from cmr_search.store import ClipStore

    root = work / f"disk-{time.monotonic_ns()}"
    store = ClipStore.open(root, create=True)
    t0 = time.perf_counter()
    ingest([data], store, IngestConfig(workers=workers), b"bench", progress=False)
    seconds = time.perf_counter() - t0
    shutil.rmtree(root)
    return seconds


def pull_ingest(server, work: Path, workers: int, sample: bool = False) -> tuple[float, int, int]:
    """Seconds to pull everything into a fresh store, the studies written, and (``sample``)
    the largest size in bytes of the pull's scratch."""
    from cmr_search.ingest import IngestConfig
    from cmr_search.ingest.dicomweb import PullConfig, pull
    from cmr_search.store import ClipStore

    root = work / f"pull-{time.monotonic_ns()}"
    store = ClipStore.open(root, create=True)
    peak, stop = [0], threading.Event()

    def size_of(folder: Path) -> int:
        total = 0
        for where, _, names in os.walk(folder):  # os.walk skips folders deleted under it
            for name in names:
                with contextlib.suppress(FileNotFoundError):  # a pass deletes its studies meanwhile
                    total += os.stat(os.path.join(where, name)).st_size
        return total

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], size_of(root / "tmp"))
            stop.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    if sample:
        watcher.start()
    t0 = time.perf_counter()
    report = pull(source(server), store, IngestConfig(workers=workers), PullConfig(), b"bench", progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    if sample:
        watcher.join()
    shutil.rmtree(root)
    return seconds, report.studies_written, peak[0]


def by_study(data: Path) -> dict[str, list[Path]]:
    """The cohort's files grouped by StudyInstanceUID, the studies in StudyDate order (as an
    archive receives them)."""
    out, day = defaultdict(list), {}
    for path in sorted(data.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "StudyDate"])
        out[str(ds.StudyInstanceUID)].append(path)
        day[str(ds.StudyInstanceUID)] = str(ds.get("StudyDate", ""))
    return {uid: out[uid] for uid in sorted(out, key=lambda u: day[u])}


def arrival_to_searchable(server, studies: dict[str, list[Path]], work: Path, every: float, rounds: int) -> list[dict]:
    """Upload one study at a time at a random moment of a sync loop's cycle; seconds until
    the store's index holds it, and that cycle's own seconds (ingest and embed)."""
    import torch

    from cmr_search.encoder.checkpoint import export_encoder
    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.model import CmrClip
    from cmr_search.encoder.registry import EncoderRegistry
    from cmr_search.ingest.dicomweb import PullConfig
    from cmr_search.pacs.sync import Syncer
    from cmr_search.store import ClipStore
    from cmr_search.store.config import IndexConfig
    from cmr_search.store.search import Searcher

    root = work / "synced"
    ClipStore.open(root, create=True)
    torch.manual_seed(0)  # an encoder's speed does not depend on its weights: the CPU architecture, random
    cfg = load_config("mvit_xs_cpu")
    model_id, _ = export_encoder(CmrClip(cfg).eval(), cfg, root, 0, latest=True)
    EncoderRegistry(root).set_default(model_id)
    uids = list(studies)
    server.upload(studies[uids[0]])  # the first study: the store is not empty when timing starts
    syncer = Syncer(root, source(server), PullConfig(), "bench")
    syncer.once()
    cycles, stop = [], threading.Event()
    loop = threading.Thread(target=syncer.run, args=(every, stop), kwargs={"on_cycle": cycles.append}, daemon=True)
    loop.start()
    out = []
    for uid in uids[1 : rounds + 1]:
        time.sleep(random.uniform(0, every))
        server.upload(studies[uid])
        t0, n_before = time.perf_counter(), len(cycles)
        while not Searcher(root, model_id, IndexConfig()).has_study(uid):
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        while len(cycles) == n_before:  # the cycle that brought it has ended
            time.sleep(0.05)
        out.append({"searchable_s": seconds, "cycle_s": cycles[-1].seconds})
        print(f"  study {len(out)}: searchable after {seconds:.1f} s (its cycle {cycles[-1].seconds:.1f} s)", flush=True)
    stop.set()
    loop.join(timeout=every + 120)
    return out


def throughput_and_sync(args, work: Path) -> None:
    """The throughput against the disk path, then the arrival-to-searchable timing."""
    data, files, size = cohort(args.studies, 5, work / "cohort")
    server = start_orthanc(work / "orthanc")
    try:
        server.upload(files)
        disk, pulled = [], []
        for _ in range(args.repeat):  # interleaved: the machine's speed drifts
            disk.append(disk_ingest(data, work, args.workers))
            pulled.append(pull_ingest(server, work, args.pull_workers or args.workers)[0])
        best_disk, best_pull = min(disk), min(pulled)
        print(f"throughput, {args.studies} studies ({len(files):,} files, {size / 1e6:.0f} MB), {args.workers} "
              f"workers ({args.pull_workers or args.workers} for the pull): disk {best_disk:.1f} s ({len(files) / best_disk:.0f} files/s), pull {best_pull:.1f} s "
              f"({len(files) / best_pull:.0f} files/s); ratio {best_pull / best_disk:.2f} (goal <= 1.5)", flush=True)
    finally:
        remove(server)
    if args.only_throughput:
        return
    server = start_orthanc(work / "orthanc-sync")  # empty: studies arrive one at a time
    try:
        timing = arrival_to_searchable(server, by_study(data), work, args.every, args.rounds)
        worst = max(t["searchable_s"] - t["cycle_s"] for t in timing)
        print(f"arrival to searchable (sync every {args.every:g} s): "
              + ", ".join(f"{t['searchable_s']:.1f} s (cycle {t['cycle_s']:.1f} s)" for t in timing)
              + f"; the worst minus its cycle {worst:.1f} s (goal < {args.every:g} s)", flush=True)
    finally:
        remove(server)
    shutil.rmtree(work / "cohort")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20, help="cohort size for the throughput")
    parser.add_argument("--working-set-studies", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--every", type=float, default=10.0, help="sync period, seconds")
    parser.add_argument("--rounds", type=int, default=3, help="studies timed from arrival to searchable")
    parser.add_argument("--only-working-set", action="store_true", help="skip the throughput and the sync timing")
    parser.add_argument("--only-throughput", action="store_true", help="skip the sync timing and the working set")
    parser.add_argument("--pull-workers", type=int, help="ingest workers of the pull (default: --workers)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.only_working_set:
            throughput_and_sync(args, work)
        if args.only_throughput:
            return
        _, big_files, big_size = cohort(args.working_set_studies, 6, work / "big")
        server = start_orthanc(work / "orthanc-big")
        try:
            server.upload(big_files)
            shutil.rmtree(work / "big")
            seconds, written, peak = pull_ingest(server, work, args.workers, sample=True)
            print(f"working set, pull of {written} studies ({big_size / 1e9:.2f} GB): the scratch peaked at "
                  f"{peak / 1e6:.0f} MB ({peak / big_size:.1%} of the cohort) in {seconds:.0f} s", flush=True)
        finally:
            remove(server)


if __name__ == "__main__":
    main()
