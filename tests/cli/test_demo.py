"""`cmr demo` end to end on a tiny cohort: every stage runs (a broken stage fails CI), the
second run skips what is done, and a cohort of another size is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CMR = [sys.executable, "-m", "cmr_search.cli"]


def test_demo_runs_every_stage_then_reuses_them(tmp_path):
    store = tmp_path / "demo" / "store"
    args = [*CMR, "demo", "--store", str(store), "--studies", "12", "--encoder-steps", "2", "--eval-seeds", "1",
            "--no-serve"]
    first = subprocess.run(args, capture_output=True, text=True, check=False, env={"COLUMNS": "200", "PATH": ""})
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("1. synthetic cohort", "2. ingest", "3. train the CPU encoder for 2 steps", "2 steps in", "4. embed",
                  "5. search", "6. head lvef-demo", "6. head disease-demo", "7. evaluate", "8. serve"):
        assert stage in first.stderr
    assert "skipped:" not in first.stderr
    model_id = (store / "encoders" / "LATEST").read_text().strip()
    cards = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (store / "heads").glob("*/card.json")}
    assert set(cards) == {"lvef-demo", "disease-demo"} and all(c["model_id"] == model_id for c in cards.values())
    assert len(cards["disease-demo"]["labels"]) > 3  # every 0/1 phenotype column present
    metrics = json.loads((store / "eval" / "metrics.json").read_text())
    assert metrics["run"]["models"]["contrastive"] == model_id and (store / "eval" / "report.html").stat().st_size
    keys = json.loads((store / "secrets" / "api_keys.json").read_text())
    assert len(keys["keys"]) == 1 and "cmr_" in first.stderr  # the key is printed once, only its hash is kept
    assert "/search/text" in first.stderr  # the example query

    second = subprocess.run(args, capture_output=True, text=True, check=False, env={"COLUMNS": "200", "PATH": ""})
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("skipped:") == 7  # cohort, ingest, encoder, embed, two heads, evaluation
    assert (store / "encoders" / "LATEST").read_text().strip() == model_id

    other = subprocess.run([*args[:6], "--studies", "13", *args[8:]], capture_output=True, text=True, check=False)
    assert other.returncode == 2 and "not 13" in other.stderr


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "issue 23, blocked on the CPU: on 2026-12-07 the example query put 1 of the demo cohort's 2 "
    "matching studies in its top 10, every hit with a grade 2-3 dilatation (dilatation is learned; "
    "the cohort has 3 thrombi in 200 studies, too few to learn from in 400 steps)"))
def test_the_demo_example_query_returns_mostly_matching_studies(tmp_path):
    """The demo as a newcomer runs it (200 studies, its fixed training steps): the query it
    prints must return studies with both findings."""
    import numpy as np

    from cmr_search.cli.demo import QUERY
    from cmr_search.encoder.embed import TextQueryEncoder
    from cmr_search.store import ClipStore
    from cmr_search.store.config import IndexConfig
    from cmr_search.store.search import Searcher

    store = tmp_path / "demo" / "store"
    done = subprocess.run([*CMR, "demo", "--store", str(store), "--eval-seeds", "1", "--no-serve"],
                          capture_output=True, text=True, check=False, env={"COLUMNS": "200", "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    labels = {r["study_uid"]: r for r in ClipStore.open(store).db.open_table("labels").to_arrow().to_pylist()}
    matching = {uid for uid, r in labels.items() if r["lv_dilatation_grade"] == 3 and r["lv_thrombus"] == 1}
    model_id = (store / "encoders" / "LATEST").read_text().strip()
    searcher = Searcher(store, model_id, IndexConfig(), encode_text=TextQueryEncoder(store))
    top = [hit.study_uid for hit in searcher.by_text(QUERY, 10)]
    found = len(matching & set(top))
    assert found >= min(5, len(matching)), (found, len(matching), np.round([labels[u]["lv_dilatation_grade"] for u in top]))
