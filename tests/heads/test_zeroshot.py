"""Zero-shot labels from prompt pairs: the score is the similarity difference, the AUROC is
metrics.stats', errors say what to do; `cmr heads zero-shot` (the evaluation's section:
tests/evals/test_evaluate.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
from head_data import write_cohort
from tiny_models import tiny_encoder_config

from cmr_search.core.exceptions import InputError, StoreError
from cmr_search.findings import FINDINGS
from cmr_search.heads import zero_shot
from cmr_search.heads.zeroshot import labelled_auroc, prompt_pair, prompt_scores
from cmr_search.metrics.stats import auroc_ci
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.synth.embeddings import embedding_cohort

CMR = [sys.executable, "-m", "cmr_search.cli"]
N = 80
UNLABELLED = range(0, N, 9)  # studies whose lv_thrombus is left blank in the label file


@pytest.fixture(scope="module")
def zs_store(tmp_path_factory):
    """A store with a random-init tiny encoder (its text tower is what is scored with) and
    synthetic study embeddings under that encoder's model_id; a label file with gaps."""
    from cmr_search.encoder.checkpoint import export_encoder
    from cmr_search.encoder.model import CmrClip

    folder = tmp_path_factory.mktemp("zeroshot")
    root = folder / "store"
    store = EmbeddingStore(ClipStore.open(root, create=True))
    cfg = tiny_encoder_config()
    torch.manual_seed(0)
    model_id, _ = export_encoder(CmrClip(cfg).eval(), cfg, root, step=0, latest=True)
    cohort = embedding_cohort(N, seed=5, dim=512, min_views=2, max_views=3)
    write_cohort(store, cohort, model_id)
    thrombus = cohort.labels["lv_thrombus"].to_pylist()
    labels = cohort.labels.set_column(3, "lv_thrombus", pa.array(
        [None if i in UNLABELLED else v for i, v in enumerate(thrombus)], pa.int64()))
    path = folder / "labels.csv"
    pacsv.write_csv(labels, path)
    return root, model_id, cohort, path


def _by_hand(root, model_id, positive: str, negative: str) -> dict[str, float]:
    """cos(study, positive) - cos(study, negative) from the stored vectors and the tower's encoding."""
    from cmr_search.encoder import load_text_encoder

    rows = EmbeddingStore.open(root).study_rows(model_id, ["study_uid", "vector"])
    vectors = EmbeddingStore.vectors(rows).astype(np.float64)
    with torch.inference_mode():
        p, n = load_text_encoder(root / "encoders" / model_id).encode([positive, negative]).double().numpy()

    def cos(v, t):
        return v @ t / (np.linalg.norm(v) * np.linalg.norm(t))

    return {u: cos(v, p) - cos(v, n) for u, v in zip(rows["study_uid"].to_pylist(), vectors)}


def test_prompt_pairs_come_from_the_lexicon_unless_given():
    assert prompt_pair("lv_thrombus") == (FINDINGS["lv_thrombus"].positive, FINDINGS["lv_thrombus"].negative)
    assert prompt_pair("lv_thrombus", positive="LV thrombus") == ("LV thrombus", FINDINGS["lv_thrombus"].negative)
    assert prompt_pair("scar", "LGE scar", "no LGE") == ("LGE scar", "no LGE")
    with pytest.raises(InputError, match="no default prompts.*both --positive TEXT and --negative TEXT"):
        prompt_pair("scar", positive="LGE scar")
    with pytest.raises(InputError, match="--negative prompt is empty"):
        prompt_pair("hcm", negative="  ")


def test_prompt_scores_and_auroc_by_hand():
    studies = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    scores = prompt_scores(studies, np.array([2.0, 0.0]), np.array([0.0, 1.0]))
    assert scores == pytest.approx([1.0, -1.0, 0.0])
    out = labelled_auroc(np.array([1.0, 0.0, np.nan]), scores)
    assert (out["auroc"], out["positives"], out["negatives"], out["unlabelled"]) == (1.0, 1, 1, 1)
    one_class = labelled_auroc(np.array([1.0, 1.0, np.nan]), scores)
    assert np.isnan(one_class["auroc"]) and one_class["positives"] == 2


def test_scores_are_the_similarity_difference_and_auroc_is_delong(zs_store):
    root, model_id, cohort, labels = zs_store
    result = zero_shot(root, "lv_thrombus", labels_path=labels)
    assert result.model_id == model_id and (result.positive, result.negative) == ("apical LV thrombus", "no LV thrombus")
    hand = _by_hand(root, model_id, result.positive, result.negative)
    assert sorted(result.study_uids) == sorted(hand) and len(hand) == N
    assert np.allclose(result.scores, [hand[u] for u in result.study_uids], rtol=0, atol=1e-9)
    truth = dict(zip(cohort.labels["study_uid"].to_pylist(), cohort.labels["lv_thrombus"].to_pylist()))
    left_out = {cohort.study_uids[i] for i in UNLABELLED}
    kept = [u for u in result.study_uids if u not in left_out]
    y = np.array([truth[u] for u in kept])
    assert 0 < y.sum() < len(y)  # both classes, or the AUROC would be n/a
    a = result.auroc
    assert (a["auroc"], a["lower"], a["upper"]) == pytest.approx(auroc_ci(y, np.array([hand[u] for u in kept])),
                                                                   abs=1e-12)
    assert (a["positives"], a["negatives"], a["unlabelled"]) == (int(y.sum()), int(len(y) - y.sum()), len(left_out))
    assert any(f"{len(left_out)} studies have no value for lv_thrombus" in p for p in result.problems)
    rows = result.rows()
    assert [r["score"] for r in rows] == sorted(result.scores.tolist(), reverse=True)
    assert set(rows[0]) == {"study_uid", "score", "label"}  # never a patient key
    assert {r["study_uid"] for r in rows if r["label"] is None} == left_out
    # override: other prompts give other scores; no labels: no AUROC
    other = zero_shot(root, "lv_thrombus", positive="thrombus in the LV apex")
    assert other.auroc is None and other.values is None and not np.allclose(other.scores, result.scores)


def test_errors_are_clear(zs_store, tmp_path):
    root, _, cohort, labels = zs_store
    with pytest.raises(InputError, match="label column 'nope' is not in"):
        zero_shot(root, "nope", "a", "b", labels_path=labels)
    with pytest.raises(InputError, match="'lvef' of .* is not binary"):
        zero_shot(root, "lvef", "low LVEF", "normal LVEF", labels_path=labels)
    empty = tmp_path / "empty.csv"
    empty.write_text("study_uid,lv_thrombus\n" + "".join(f"{u},\n" for u in cohort.study_uids))
    with pytest.raises(InputError, match="no embedded study has a usable value of lv_thrombus"):
        zero_shot(root, "lv_thrombus", labels_path=empty)
    with pytest.raises(InputError, match="no default prompts"):
        zero_shot(root, "scar")
    with pytest.raises(InputError, match="no study embeddings of model other"):
        zero_shot(root, "hcm", model_id="other")
    # embeddings of a model whose encoder this store does not hold (the published checkpoint's)
    bare = EmbeddingStore(ClipStore.open(tmp_path / "bare", create=True))
    with pytest.raises(StoreError, match="no study embeddings"):
        zero_shot(tmp_path / "bare", "hcm")
    write_cohort(bare, embedding_cohort(6, seed=1, dim=512, min_views=2, max_views=2), "published")
    with pytest.raises(InputError, match="zero-shot labels need the text tower of model published"):
        zero_shot(tmp_path / "bare", "hcm")


def test_cli_zero_shot(zs_store, tmp_path):
    root, model_id, _, labels = zs_store
    base = [*CMR, "heads", "zero-shot", "--store", str(root), "--label", "lv_thrombus"]
    out = tmp_path / "scores.csv"
    done = subprocess.run([*base, "--labels", str(labels), "--out", str(out)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the scores went to the file
    said = done.stderr.replace("\n", " ")
    assert f"on model {model_id}: {N} studies" in said and "'apical LV thrombus' against 'no LV thrombus'" in said
    assert "AUROC 0." in said and "CI" in said and "DeLong" in said and "positives" in said
    assert f"{len(UNLABELLED)} studies without a label left out" in said
    with open(out, newline="") as fp:
        rows = list(csv.DictReader(fp))
    assert len(rows) == N and list(rows[0]) == ["study_uid", "score", "label"]
    assert not any("pk" in v for r in rows for v in r.values())
    js = subprocess.run([*base, "--labels", str(labels), "--json"], capture_output=True, text=True, check=False)
    assert js.returncode == 0, js.stderr
    summary = json.loads(js.stdout)
    api = zero_shot(root, "lv_thrombus", labels_path=labels)
    assert summary["auroc"] == pytest.approx(api.auroc["auroc"]) and summary["studies"] == N
    assert [r["study_uid"] for r in summary["scores"]] == [r["study_uid"] for r in api.rows()]
    bad = subprocess.run([*CMR, "heads", "zero-shot", "--store", str(root), "--label", "scar", "--positive", "scar"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--negative" in bad.stderr

