"""Chaos rounds: concurrent writers on one store, killed at random, then the invariants.

    python benchmarks/chaos.py [--rounds 200] [--studies 12] [--data DICOM_DIR] [--work DIR] [--seed 0]

Each round readmits what the last one withdrew, then starts at once, each in its own
process group: ``cmr ingest`` of the whole cohort, ``cmr embed``, a replacement of one
stored study with one clip fewer (``EmbeddingStore.put_study``, what an upload with
``persist=true`` runs) and ``cmr delete`` of another. After a random 0.2-6 s a random
subset of them is killed with SIGKILL (the whole group: pool workers and the forkserver
too); the others finish. A last ``cmr embed`` runs to the end, as an operator would after a
crash, and the store is checked:

1. every clip has exactly one view row of each model that embedded the store;
2. every view row's clip exists, and every study row pools clips its study still has;
3. no withdrawn study (one with a tombstone) has a row in any table, a vector in any
   index, or a hit in a search;
4. each FAISS index holds exactly the ids of its table;
5. scan-to-scan search answers.

Goal (issue 22): 200 rounds with 0 invariant violations. ``--rounds 1`` runs in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CMR = [sys.executable, "-m", "cmr_search.cli"]

REPLACE = """
import sys
from datetime import UTC, datetime
from cmr_search.core.layout import StoreLayout
from cmr_search.store.embedding_store import EmbeddingStore
root, uid = sys.argv[1], sys.argv[2]
store = EmbeddingStore.open(root)
model = StoreLayout(root).latest_model_id()
where = f"study_uid = '{uid}'"
clips = store.clip_store.clips.search().where(where).limit(None).to_list()
views = {v["clip_id"]: v for v in store.rows("views", model, where=where).to_pylist()}
study = store.get_study(uid, model)
keep = sorted(c["clip_id"] for c in clips)[1:]
if study is None or len(keep) < 2 or any(c not in views for c in keep):
    sys.exit(0)  # not embedded yet: nothing to replace this round
drop = ("vec_id", "rev", "embedded_at")
now = datetime.now(UTC)
store.put_study([c | {"ingested_at": now} for c in clips if c["clip_id"] in keep],
                [{k: v for k, v in views[c].items() if k not in drop} for c in keep],
                {k: v for k, v in study.items() if k not in drop} | {"clip_ids": keep, "n_views": len(keep),
                                                                      "attention": [1 / len(keep)] * len(keep)})
"""


def prepare(work: Path, data: Path | None, studies: int, seed: int) -> tuple[Path, Path]:
    """The cohort (generated unless given) and a store with half of it ingested and a
    random-init CPU encoder as LATEST."""
    from cmr_search.core.layout import StoreLayout
    from cmr_search.encoder.checkpoint import export_encoder
    from cmr_search.encoder.config import load_config
    from cmr_search.encoder.model import CmrClip

    if data is None:
        data = work / "cohort" / "dicom"
        if not data.exists():
            from cmr_search.synth import generate_cohort

            generate_cohort(studies, work / "cohort", seed=seed, workers=2, progress=False)
    root = work / "store"
    if not (root / "store.json").exists():
        folders = sorted(p for p in data.iterdir() if p.is_dir())
        subprocess.run([*CMR, "ingest", *map(str, folders[: max(1, len(folders) // 2)]), "--store", str(root),
                        "--workers", "2"], check=True, capture_output=True)
        import torch

        torch.manual_seed(seed)
        cfg = load_config("mvit_xs_cpu")
        export_encoder(CmrClip(cfg).eval(), cfg, root, step=0, latest=True)
        assert StoreLayout(root).latest_model_id()
    return data, root


def study_uids(root: Path) -> list[str]:
    """The stored studies."""
    from cmr_search.store.clip_store import ClipStore

    return sorted(ClipStore.open(root).study_uids())


def one_round(root: Path, data: Path, rng: np.random.Generator, log: Path) -> dict:
    """Start the writers, kill some, let the rest finish, recover; what happened."""
    from cmr_search.store.embedding_store import EmbeddingStore
    from cmr_search.store.withdrawal import readmit

    uids = study_uids(root)
    readmit(EmbeddingStore.open(root), study_uids=uids + _all_cohort_uids(data))
    replace_uid, delete_uid = (rng.choice(uids, 2, replace=False).tolist() if len(uids) >= 2 else (None, None))
    commands = {
        "ingest": [*CMR, "ingest", str(data), "--store", str(root), "--json", "--workers", "1"],
        "embed": [*CMR, "embed", "--store", str(root)],
    }
    if replace_uid:
        commands["replace"] = [sys.executable, "-c", REPLACE, str(root), replace_uid]
        commands["delete"] = [*CMR, "delete", "--store", str(root), "--study", delete_uid, "--json"]
    with open(log, "a") as out:
        procs = {name: subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
                 for name, cmd in commands.items()}
        time.sleep(float(rng.uniform(0.2, 6.0)))
        victims = [name for name in procs if rng.random() < 0.5]
        for name in victims:
            try:
                os.killpg(procs[name].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        codes = {name: proc.wait(600) for name, proc in procs.items()}
        recovered = subprocess.run([*CMR, "embed", "--store", str(root)], stdout=out, stderr=out, check=False)
    failed = {name: code for name, code in codes.items() if name not in victims and code not in (0, 3)}
    if recovered.returncode != 0:
        failed["recovery embed"] = recovered.returncode
    return {"killed": victims, "failed": failed, "deleted": delete_uid}


def _all_cohort_uids(data: Path) -> list[str]:
    import pydicom

    uids = set()
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        first = next(folder.rglob("*.dcm"), None)
        if first is not None:
            uids.add(str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID))
    return sorted(uids)


def violations(root: Path) -> list[str]:
    """Every broken invariant of the store, in words (empty when all hold)."""
    from cmr_search.store.config import IndexConfig
    from cmr_search.store.embedding_store import EmbeddingStore
    from cmr_search.store.index import VectorIndex
    from cmr_search.store.search import Searcher
    from cmr_search.store.tombstones import Tombstones

    store = EmbeddingStore.open(root)
    found: list[str] = []
    clips = store.clip_store.clip_metadata(["clip_id", "study_uid"]).to_pydict()
    clip_study = dict(zip(clips["clip_id"], clips["study_uid"]))
    withdrawn = Tombstones(store.layout).withdrawn(_every_uid(store))
    for model_id in store.model_ids("views"):
        views = store.rows("views", model_id, ["clip_id", "study_uid"]).to_pydict()
        counts: dict[str, int] = {}
        for clip_id in views["clip_id"]:
            counts[clip_id] = counts.get(clip_id, 0) + 1
        found += [f"{model_id}: clip {c} has {counts.get(c, 0)} view rows" for c in clip_study if counts.get(c, 0) != 1]
        found += [f"{model_id}: view of a clip that is gone ({c})" for c in counts if c not in clip_study]
        for row in store.rows("studies", model_id, ["study_uid", "clip_ids"]).to_pylist():
            stale = [c for c in row["clip_ids"] if clip_study.get(c) != row["study_uid"]]
            if stale:
                found.append(f"{model_id}: study {row['study_uid']} pools {len(stale)} clips it no longer has")
        for table in ("views", "studies"):
            index = VectorIndex.open(store, table, model_id, IndexConfig())
            ids = store.rows(table, model_id, ["vec_id"])["vec_id"].to_numpy()
            if sorted(index.ids.tolist()) != sorted(ids.tolist()):
                found.append(f"{model_id}: the {table} index holds other ids than its table")
            held = set(index.meta["study_uid"].to_pylist())
            found += [f"{model_id}: withdrawn study {u} in the {table} index" for u in withdrawn & held]
    for name in ("clips", "reports", "labels", "views", "studies"):
        if store.has(name):
            present = set(store.clip_store.db.open_table(name).search().select(["study_uid"]).limit(None)
                          .to_arrow()["study_uid"].to_pylist())
            found += [f"withdrawn study {u} has rows in {name}" for u in withdrawn & present]
    if store.has("studies") and store.count("studies"):
        searcher = Searcher(root)
        some = store.rows("studies", searcher.model_id, ["study_uid"])["study_uid"].to_pylist()
        if some:
            hits = searcher.by_study(some[0], k=50)
            found += [f"search returned withdrawn study {h.study_uid}" for h in hits if h.study_uid in withdrawn]
    return found


def _every_uid(store) -> set[str]:
    """Every study_uid any table or index could hold (the tombstones hold only hashes)."""
    uids: set[str] = set()
    for name in ("clips", "reports", "labels", "views", "studies"):
        if store.has(name):
            uids |= set(store.clip_store.db.open_table(name).search().select(["study_uid"]).limit(None)
                        .to_arrow()["study_uid"].to_pylist())
    return uids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--data", type=Path, help="a DICOM cohort folder (one sub-folder per study)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    data, root = prepare(work, args.data, args.studies, args.seed)
    rng = np.random.default_rng(args.seed)
    totals = {"rounds": 0, "violations": 0, "failed": 0, "killed": 0, "seconds": 0.0}
    started = time.perf_counter()
    for r in range(args.rounds):
        outcome = one_round(root, data, rng, work / "writers.log")
        broken = violations(root)
        totals["rounds"] += 1
        totals["violations"] += len(broken)
        totals["failed"] += len(outcome["failed"])
        totals["killed"] += len(outcome["killed"])
        print(f"round {r}: killed {outcome['killed']} failed {outcome['failed']} "
              f"violations {len(broken)}" + "".join(f"\n  {b}" for b in broken[:20]), flush=True)
    totals["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n{totals['rounds']} rounds, {totals['killed']} writers killed: {totals['violations']} invariant "
          f"violations, {totals['failed']} writers that failed without being killed, {totals['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(totals, indent=1))
    sys.exit(1 if totals["violations"] or totals["failed"] else 0)


if __name__ == "__main__":
    main()
