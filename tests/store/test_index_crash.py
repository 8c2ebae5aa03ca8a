"""kill -9 in the middle of upserts, index syncs and withdrawals: reopening gives a store
whose index holds exactly the table's rows and whose withdrawals are finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from store_data import MODEL, clustered, make_store

from cmr_search.store.config import IndexConfig
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.index import VectorIndex
from cmr_search.store.withdrawal import finish_pending_withdrawals

WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from store_data import study_rows
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.store.config import IndexConfig
from cmr_search.store.index import VectorIndex
from cmr_search.store.withdrawal import withdraw
store = EmbeddingStore.open(sys.argv[1])
cfg = IndexConfig(exact_below=150, nlist=8, nprobe=8)
rng = np.random.default_rng(int(sys.argv[3]))
step = 0
while True:
    step += 1
    start = int(rng.integers(0, 400))  # overlaps existing studies: inserts and replacements
    store.upsert_studies(study_rows(int(rng.integers(1, 30)), seed=1000 * int(sys.argv[3]) + step, start=start))  # no repeated vectors: no ties
    VectorIndex.open(store, "studies", "m-test", cfg)  # sync + save a new generation
    if step % 3 == 0:
        uids = store.rows("studies", "m-test", ["study_uid"])["study_uid"].to_pylist()
        withdraw(store, study_uids=[uids[int(rng.integers(0, len(uids)))]], purge=bool(step % 2))
    print(step, flush=True)
"""


def test_kill_9_mid_write_leaves_a_consistent_store_and_index(tmp_path):
    root = tmp_path / "store"
    make_store(root, n=120, views=False)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    here = str(Path(__file__).parents[1])  # tests/: store_data.py
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    rng = np.random.default_rng(0)
    cfg = IndexConfig(exact_below=150, nlist=8, nprobe=8)
    steps = 0
    for round_ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(root), here, str(round_)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = proc.stdout.readline()  # wait out the imports: kill inside the write loop
        time.sleep(float(rng.uniform(0.3, 2.0)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        steps += len((first + proc.stdout.read()).split())
        pending = [json.loads(p.read_text())["study_uids"] for p in (root / "journal").glob("withdraw-*.json")] \
            if (root / "journal").exists() else []

        store = EmbeddingStore.open(root)
        finish_pending_withdrawals(store)  # finishes an interrupted withdrawal
        assert not list((root / "journal").glob("withdraw-*"))
        for uids in pending:
            for uid in uids:
                assert store.get_study(uid, MODEL) is None
        index = VectorIndex.open(store, "studies", MODEL, cfg)
        rows = store.rows("studies", MODEL, ["vec_id", "vector"])
        ids = rows["vec_id"].to_numpy()
        assert sorted(index.ids) == sorted(ids) and index.index.ntotal == len(ids)
        assert index.version == store.version("studies")
        vectors = EmbeddingStore.vectors(rows)
        for q in clustered(5, seed=round_):
            _, got = index.search(q, 5, nprobe=index.nlist or None)  # exhaustive: compare with exact
            assert list(got[0]) == list(ids[np.argsort(-(vectors @ q), kind="stable")[:5]])
    assert steps >= 8  # the kills landed among many writes, not before the first
