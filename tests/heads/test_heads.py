"""Heads on stored embeddings: masking, losses, splits, training, the registry and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from head_data import MODEL, make_head_store, write_cohort

from cmr_search.core.exceptions import InputError
from cmr_search.heads import HeadConfig, HeadRegistry, evaluate_head, train_head
from cmr_search.heads.data import load_bags, load_labels, patient_split, sample_fraction
from cmr_search.heads.model import MILHead
from cmr_search.heads.train import _pos_weight, head_loss
from cmr_search.store import ClipStore
from cmr_search.store.embedding_store import EmbeddingStore
from cmr_search.synth.embeddings import embedding_cohort

CMR = [sys.executable, "-m", "cmr_search.cli"]


@pytest.fixture(scope="module")
def head_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads") / "store"
    store, cohort = make_head_store(root, n=400)
    return root, store, cohort


@pytest.fixture(scope="module")
def bags(head_store):
    return load_bags(head_store[1], MODEL)


def test_padding_changes_nothing_and_attention_sums_to_one():
    torch.manual_seed(0)
    head = MILHead(512, 2, hidden=32, layernorm=True, dropout=0.0).eval()
    views = torch.randn(3, 5, 512)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out, att = head(None, views, mask)
    garbage = views.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), 512)  # whatever sits in the padding
    wide = torch.cat([garbage, torch.randn(3, 4, 512)], 1)  # and more padding
    out2, att2 = head(None, wide, torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1))
    assert torch.allclose(out, out2, atol=1e-5)
    assert (att[~mask] == 0).all() and (att2[:, 5:] == 0).all()
    assert torch.allclose(att.sum(1), torch.ones(3))
    alone, _ = head(None, views[:1, :3], mask[:1, :3])  # a bag scored on its own, unpadded
    assert torch.allclose(alone, out[:1], atol=1e-5)


def test_bags_group_views_by_study_in_view_order(bags, head_store):
    _, _, cohort = head_store
    assert len(bags) == 400 and bags.views.shape[2] == 512
    i = bags.study_uids.index(cohort.study_uids[7])
    n = len(cohort.view_names[7])
    assert int(bags.mask[i].sum()) == n
    assert [v["view"] for v in bags.view_names[i]][:3] == ["4CH", "3CH", "2CH"]
    assert np.allclose(bags.views[i, 0].numpy(), cohort.views[7, 0], atol=1e-6)


def test_bce_weighting_and_missing_labels():
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [0.0, 0.0], [0.0, float("nan")]])
    pw = _pos_weight(y)
    assert torch.allclose(pw, torch.tensor([3.0, 1.0]))  # 3 negatives / 1 positive; 1 / 1
    logits = torch.tensor([[0.3, -2.0], [0.1, 0.4], [-0.5, 0.2], [1.0, 5.0]])
    loss = head_loss("binary", logits, y, 1.0, pw)
    by_hand = []
    for i in range(4):
        for j in range(2):
            if torch.isnan(y[i, j]):
                continue
            p = torch.sigmoid(logits[i, j])
            by_hand.append(-(pw[j] * y[i, j] * torch.log(p) + (1 - y[i, j]) * torch.log(1 - p)))
    assert torch.isclose(loss, torch.stack(by_hand).mean(), atol=1e-6)
    changed = logits.clone()
    changed[0, 1] = changed[3, 1] = 99.0  # outputs where the label is missing do not count
    assert torch.isclose(head_loss("binary", changed, y, 1.0, pw), loss)


def test_split_is_by_patient_stratified_and_seeded(bags, head_store):
    store = head_store[1]
    labels = load_labels(store, bags, ["lv_thrombus"])
    train, val, test = patient_split(bags, labels, 0.15, 0.15, seed=0)
    parts = [set(bags.patient_keys[p]) for p in (train, val, test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(train) + len(val) + len(test) == labels.usable().sum()
    y = labels.values[:, 0]
    for part in (train, val, test):  # the rare label reaches every split
        assert y[part].sum() >= 1
    again = patient_split(bags, labels, 0.15, 0.15, seed=0)
    other = patient_split(bags, labels, 0.15, 0.15, seed=1)
    assert all((a == b).all() for a, b in zip(again, (train, val, test)))
    assert not np.array_equal(other[2], test)
    tenth = sample_fraction(bags, labels, train, 0.1, seed=0)
    assert set(tenth) <= set(train)
    n_patients = len(set(bags.patient_keys[train]))
    assert abs(len(set(bags.patient_keys[tenth])) - round(0.1 * n_patients)) <= 1
    assert not np.array_equal(tenth, sample_fraction(bags, labels, train, 0.1, seed=1))


@pytest.mark.parametrize("kind", ["linear", "mil"])
def test_heads_learn_lvef_and_labels(head_store, kind):
    root = head_store[0]
    head, _ = train_head(root, ["lvef"], HeadConfig(kind=kind), model_id=MODEL, name=f"lvef-{kind}")
    test = head.card["metrics"]["test"]["lvef"]
    assert test["mae"] < 4.0 and abs(test["bias"]) < 2.0  # LVEF SD is 11 points
    assert test["loa_low"] < test["bias"] < test["loa_high"]
    multi, _ = train_head(root, ["reduced_lvef", "lv_thrombus"], HeadConfig(kind=kind), model_id=MODEL,
                          name=f"multi-{kind}")
    assert multi.card["task"] == "multilabel"
    m = multi.card["metrics"]["test"]
    assert m["reduced_lvef"]["auroc"] > 0.9 and m["lv_thrombus"]["auroc"] > 0.6
    assert 0 <= m["reduced_lvef"]["sensitivity"] <= 1 and "threshold" in m["reduced_lvef"]


def test_mil_attention_finds_the_informative_views(head_store):
    root, store, cohort = head_store
    head, _ = train_head(root, ["lvef"], HeadConfig(kind="mil"), model_id=MODEL, name="lvef-att", replace=True)
    rows = head.predict(store, cohort.study_uids[:50])
    sax = [sum(a["weight"] for a in r["attention"] if a["view"] == "SAX") for r in rows]
    share = [sum(a["view"] == "SAX" for a in r["attention"]) / len(r["attention"]) for r in rows]
    assert np.mean(sax) > np.mean(share) + 0.1  # short-axis slices carry LVEF in this cohort
    assert all(abs(sum(a["weight"] for a in r["attention"]) - 1) < 1e-5 for r in rows)


def test_registry_round_trip_and_card(head_store, bags):
    root, store, cohort = head_store
    head, _ = train_head(root, ["reduced_lvef"], HeadConfig(kind="mil", max_epochs=5), model_id=MODEL, name="rt")
    card = HeadRegistry(root).card("rt")
    for key in ("task", "labels", "kind", "model_id", "label_sha256", "split", "metrics", "training_seconds", "config"):
        assert key in card
    assert card["split"]["split_seed"] == 0 and card["model_id"] == MODEL and card["task"] == "binary"
    loaded = HeadRegistry(root).load("rt")
    first = head.predict(store, cohort.study_uids[:5])
    assert loaded.predict(store, cohort.study_uids[:5]) == first
    assert 0 <= first[0]["prediction"]["reduced_lvef"] <= 1 and "positive" in first[0]
    evaluated = evaluate_head(root, "rt")
    assert evaluated["studies"] == card["split"]["test_studies"]
    assert evaluated["metrics"]["reduced_lvef"]["auroc"] == pytest.approx(card["metrics"]["test"]["reduced_lvef"]["auroc"])
    with pytest.raises(InputError, match="--replace"):
        train_head(root, ["reduced_lvef"], HeadConfig(max_epochs=1), model_id=MODEL, name="rt")
    with pytest.raises(InputError, match="no head named"):
        HeadRegistry(root).load("nope")


def test_head_refuses_embeddings_of_another_model(head_store, tmp_path):
    root, _, _ = head_store
    head, _ = train_head(root, ["lvef"], HeadConfig(kind="linear", max_epochs=2), model_id=MODEL, name="mm")
    other = EmbeddingStore(ClipStore.open(tmp_path / "other", create=True))
    cohort = embedding_cohort(20, seed=5, max_views=6)
    write_cohort(other, cohort, model_id="another-model")
    with pytest.raises(InputError, match="no study embeddings of model m-heads"):
        head.predict(other, cohort.study_uids[:1])
    with pytest.raises(InputError, match="trained on embeddings of model m-heads"):
        head.predict_bags(load_bags(other, "another-model"))


def test_bad_label_files_give_clear_errors(head_store, bags, tmp_path):
    store, cohort = head_store[1], head_store[2]
    uids = cohort.study_uids
    messy = tmp_path / "messy.csv"
    messy.write_text("study_uid,lvef,grade\n" + "".join(
        f"{u},{'not done' if i % 10 == 0 else '' if i % 10 == 1 else 40 + i % 30},{i % 3}\n" for i, u in enumerate(uids))
        + "2.25.not.embedded,55,1\n")
    labels = load_labels(store, bags, ["lvef"], messy)
    text = " ".join(labels.problems)
    assert "40 value(s) are not numbers" in text and "'not done'" in text
    assert "1 labelled studies have no embedding" in text and "have no value for lvef" in text
    assert labels.usable().sum() == 320 and labels.task == "regression"
    with pytest.raises(InputError, match="'ef' is not in .*columns: lvef, grade"):
        load_labels(store, bags, ["ef"], messy)
    with pytest.raises(InputError, match="classification needs 0/1"):
        load_labels(store, bags, ["grade"], messy, task="binary")
    no_key = tmp_path / "nokey.csv"
    no_key.write_text("id,lvef\n1,50\n")
    with pytest.raises(InputError, match="no 'study_uid' column"):
        load_labels(store, bags, ["lvef"], no_key)
    with pytest.raises(InputError, match="does not exist"):
        load_labels(store, bags, ["lvef"], tmp_path / "absent.csv")
    with pytest.raises(InputError, match="fraction"):
        HeadConfig(fraction=0)


def test_cli_train_list_predict_evaluate(head_store, tmp_path):
    root, _, cohort = head_store
    base = ["--store", str(root)]
    out = subprocess.run([*CMR, "heads", "train", *base, "--label", "lvef", "--kind", "mil", "--fraction", "0.5",
                          "--name", "cli-lvef", "--json"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    card = json.loads(out.stdout)
    assert card["name"] == "cli-lvef" and card["split"]["fraction"] == 0.5
    assert card["split"]["train_studies"] < card["split"]["train_studies_full"]
    listed = json.loads(subprocess.run([*CMR, "heads", "list", *base, "--json"], capture_output=True, text=True, check=False).stdout)
    assert "cli-lvef" in [c["name"] for c in listed]
    pred = subprocess.run([*CMR, "heads", "predict", *base, "--head", "cli-lvef", "--study", cohort.study_uids[3], "--json"],
                          capture_output=True, text=True, check=False)
    assert pred.returncode == 0, pred.stderr
    row = json.loads(pred.stdout)[0]
    assert row["study_uid"] == cohort.study_uids[3] and 15 <= row["prediction"]["lvef"] <= 80
    assert {"view", "slice_index", "clip_id", "weight"} <= set(row["attention"][0])
    human = subprocess.run([*CMR, "heads", "predict", *base, "--head", "cli-lvef", "--study", cohort.study_uids[3]],
                           capture_output=True, text=True, check=False)
    assert "SAX slice" in human.stderr
    ev = json.loads(subprocess.run([*CMR, "heads", "evaluate", *base, "--head", "cli-lvef", "--json"],
                                   capture_output=True, text=True, check=False).stdout)
    assert ev["metrics"]["lvef"]["n"] == card["split"]["test_studies"]
    bad = subprocess.run([*CMR, "heads", "train", *base, "--label", "nope"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "label column 'nope' is not in store" in bad.stderr.replace("\n", " ")
