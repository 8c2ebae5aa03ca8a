"""`cmr eval`: cluster agreement and map helpers against hand-computed values, the figures,
the report's sections, and the whole evaluation on the session's trained store."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from browser import CHROMIUM, DRIVER, open_chromium
from store_data import copy_store

from cmr_search.evals.config import EvalConfig
from cmr_search.evals.plots import bland_altman_plot, efficiency_plot, map_plot
from cmr_search.evals.report import SECTIONS, render_html, write_report
from cmr_search.metrics.clusters import (
    cluster_agreement,
    embedding_map,
    main_phenotype,
    neighbour_agreement,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_cluster_agreement_by_hand():
    clusters = np.array([0, 0, 0, 1, 1, -1])
    classes = np.array(["a", "a", "b", "b", "b", "a"])
    out = cluster_agreement(clusters, classes)
    # clustered points: cluster 0 holds a, a, b (majority 2), cluster 1 holds b, b (2): 4 of 5
    assert out["purity"] == pytest.approx(4 / 5)
    assert out["clusters"] == 2 and out["noise"] == 1
    perfect = cluster_agreement(np.array([1, 1, 0, 0]), np.array(["x", "x", "y", "y"]))
    assert perfect["ari"] == pytest.approx(1.0) and perfect["purity"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        cluster_agreement(np.array([0, 1]), np.array(["a"]))


def test_main_phenotype_prefers_the_rarest_positive_label():
    labels = {"common": np.array([1, 1, 1, 0, np.nan]), "rare": np.array([1, 0, 0, 0, np.nan])}
    assert main_phenotype(labels, ["common", "rare"]).tolist() == ["rare", "common", "common", "none", "unknown"]


def test_neighbour_agreement_against_chance():
    # two tight groups far apart: every nearest neighbour shares the group
    x = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0, 1], [0.14, 0.99], [0.2, 0.98]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups = np.array(["a", "a", "a", "b", "b", "b"])
    out = neighbour_agreement(x, groups, k=2)
    assert out["same_group"] == 1.0
    assert out["chance"] == pytest.approx((3 * 2 + 3 * 2) / (6 * 5))  # a random other point shares the group
    mixed = neighbour_agreement(x, np.array(["a", "b", "a", "b", "a", "b"]), k=1)
    assert mixed["same_group"] < 0.5


def test_embedding_map_shapes():
    x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    for method in ("tsne", "pca"):
        xy = embedding_map(x, method)
        assert xy.shape == (40, 2) and np.isfinite(xy).all()
    assert embedding_map(x[:3]).shape == (3, 2)


def test_figures_are_png():
    rng = np.random.default_rng(1)
    y = rng.uniform(20, 70, 30)
    assert bland_altman_plot(y, y + rng.normal(0, 3, 30), 0.1, -5.8, 6.0, "t").startswith(PNG)
    rows = [{"model": m, "fraction": f, "mae": rng.uniform(3, 9)} for m in ("contrastive", "baseline")
            for f in (0.1, 1.0) for _ in range(3)]
    assert efficiency_plot(rows, "mae", "MAE", "t").startswith(PNG)
    xy = rng.normal(size=(30, 2))
    assert map_plot(xy, {"lvef": y, "sex": np.array(["F", "M"] * 15, object)}, "t").startswith(PNG)


class _Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.external = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.add(attrs.get("id"))
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)


def test_report_renders_every_section_even_when_empty(tmp_path):
    metrics = {"run": {"models": {"contrastive": "abc"}}, "heads": {"lvef": {"contrastive": {
        "n": 3, "mae": 1.0, "abs_error_sd": 0.5, "rmse": 1.2, "r": float("nan"), "bias": 0.1, "loa_low": -2.0,
        "loa_high": 2.2}}}}
    page = render_html(metrics, {})
    parser = _Sections()
    parser.feed(page)
    assert parser.ids == set(SECTIONS) and not parser.external
    metrics_path, report_path = write_report(tmp_path, metrics, {})
    assert json.loads(metrics_path.read_text())["heads"]["lvef"]["contrastive"]["r"] is None  # NaN -> null
    assert report_path.read_text() == page


def test_eval_config_refuses_bad_values():
    from cmr_search.core.exceptions import InputError

    with pytest.raises(InputError, match="fractions"):
        EvalConfig(fractions=(0.0, 1.0))
    with pytest.raises(InputError, match="baseline"):
        EvalConfig(baseline="kinetics")


def test_zero_shot_section_beside_the_head_as_metrics_stats_gives_it():
    """``zero_shot_labels`` on a held-out split: the zero-shot and head AUROCs and the paired p
    are metrics.stats' on the same arrays; a label without prompts is skipped; the page shows it."""
    import torch

    from cmr_search.evals.efficiency import HeldOut
    from cmr_search.evals.zeroshot import zero_shot_labels
    from cmr_search.heads.data import Bags
    from cmr_search.heads.zeroshot import prompt_scores
    from cmr_search.metrics.stats import auroc_ci, delong_test

    rng = np.random.default_rng(3)
    n, test = 60, np.arange(0, 60, 2)
    y = (np.arange(n) % 4 == 0).astype(float)
    y[5] = np.nan  # no label: left out of every AUROC
    studies = rng.standard_normal((n, 16)).astype(np.float32)
    bags = Bags("m", [f"s{i}" for i in range(n)], np.array([f"p{i}" for i in range(n)], object),
                torch.from_numpy(studies), torch.zeros(n, 1, 16), torch.zeros(n, 1, dtype=torch.bool))
    head = HeldOut("contrastive", ["scar", "lv_thrombus"], test, np.stack([y[test], y[test]], 1),
                   rng.random((len(test), 2)), 1.0, 0, 30)
    texts: dict[str, np.ndarray] = {}

    def encode(batch):  # a fixed embedding per prompt, so the scores can be recomputed
        return np.stack([texts.setdefault(t, rng.standard_normal(16)) for t in batch])

    out = zero_shot_labels(encode, bags, {"lv_thrombus": y, "scar": y}, ["scar", "lv_thrombus"], head)
    assert out["skipped"] == ["scar"] and [r["label"] for r in out["labels"]] == ["lv_thrombus"]
    row = out["labels"][0]
    assert (row["positive"], row["negative"]) == ("apical LV thrombus", "no LV thrombus")
    scores = prompt_scores(studies, texts[row["positive"]], texts[row["negative"]])
    known = ~np.isnan(y)
    assert (row["all"]["auroc"], row["all"]["lower"], row["all"]["upper"]) == pytest.approx(
        auroc_ci(y[known].astype(int), scores[known]))
    assert row["all"]["unlabelled"] == 1
    yt = y[test].astype(int)
    held = row["held_out"]
    assert (held["zero_shot"]["auroc"], held["zero_shot"]["upper"]) == pytest.approx(
        np.array(auroc_ci(yt, scores[test]))[[0, 2]])
    assert held["head"]["auroc"] == pytest.approx(auroc_ci(yt, head.pred[:, 1])[0])
    assert held["p_delong"] == pytest.approx(delong_test(yt, scores[test], head.pred[:, 1]))
    page = render_html({"zero_shot": out}, {})
    assert "zero-shot AUROC" in page and "linear head AUROC" in page and "apical LV thrombus / no LV thrombus" in page


def test_cmr_eval_on_a_trained_store(trained_store, tmp_path):
    """The whole evaluation through the CLI: both models, every section, figures embedded."""
    root, model_id = trained_store
    store = tmp_path / "store"
    copy_store(root, store)  # the baseline is embedded into the store: keep the shared one as it is
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "cmr_search.cli", "eval", "--store", str(store), "--out", str(out),
                           "--fractions", "0.5,1", "--seeds", "1", "--map", "pca", "-k", "3", "--json"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout)
    run = metrics["run"]
    assert run["models"]["contrastive"] == model_id and run["models"]["baseline"] != model_id
    assert run["studies"] == 10
    own = metrics["text_retrieval"]["own_report"]
    assert own["pool"] == 10 and 0 <= own["R@1"] <= own["R@5"] <= own["R@10"] == 1.0
    assert set(metrics["scan_to_scan"]) == {"contrastive", "baseline"}
    efficiency = metrics["heads"]["efficiency"]
    # 2 fractions x 1 seed x 2 models, for LVEF and for the disease labels
    assert len([r for r in efficiency if r["task"] == "lvef"]) == 4
    assert {r["model"] for r in efficiency} == {"contrastive", "baseline"}
    assert metrics["heads"]["lvef"]["contrastive"]["mae"] > 0
    assert metrics["registered_heads"][0]["name"] == "lvef-mil"
    zero_shot = metrics["zero_shot"]  # every phenotype with a prompt pair, beside the disease head
    assert zero_shot["model_id"] == model_id and zero_shot["labels"]
    assert [r["label"] for r in zero_shot["labels"]] == [p for p in run["phenotypes"] if p not in zero_shot["skipped"]]
    for row in zero_shot["labels"]:
        assert row["all"]["positives"] + row["all"]["negatives"] + row["all"]["unlabelled"] == 10
        assert set(row["held_out"]) == {"zero_shot", "head", "p_delong"}
        if row["all"]["negatives"] and row["all"]["positives"]:
            assert 0 <= row["all"]["auroc"] <= 1
    page = (out / "report.html").read_text()
    parser = _Sections()
    parser.feed(page)
    assert parser.ids == set(SECTIONS) and not parser.external
    assert page.count("data:image/png;base64,") >= 4
    # the trained model stays the store's default; the baseline is only beside it
    assert (store / "encoders" / "LATEST").read_text().strip() == model_id
    if CHROMIUM.exists() and DRIVER.exists():  # and a real browser shows every figure
        browser = open_chromium(tmp_path / "chromium")
        try:
            browser.get((out / "report.html").as_uri())
            shown = browser.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth)")
            sections = browser.execute_script("return Array.from(document.querySelectorAll('section h2')).length")
        finally:
            browser.quit()
        assert len(shown) >= 4 and all(w > 100 for w in shown) and sections == len(SECTIONS)


def test_cmr_eval_scores_plain_prediction_files(tmp_path):
    """`cmr eval --predictions A --baseline-predictions B`: a CSV of study id, score, label per
    model gives each model's AUROC with DeLong limits and the paired test, as evals.stats does."""
    from cmr_search.metrics.stats import auroc_ci, delong_test

    rng = np.random.default_rng(7)
    y = (rng.random(120) < 0.3).astype(int)
    a, b = y * 0.8 + rng.normal(0, 0.5, 120), y * 0.3 + rng.normal(0, 0.5, 120)
    order = rng.permutation(120)  # the second file in another row order: pairing is by study id
    for name, scores, rows in (("a.csv", a, range(120)), ("b.csv", b, order)):
        lines = ["study_id,score,label"] + [f"s{i},{float(scores[i])!r},{y[i]}" for i in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "cmr_search.cli", "eval", "--predictions", str(tmp_path / "a.csv"),
                           "--baseline-predictions", str(tmp_path / "b.csv"), "--out", str(tmp_path / "out"),
                           "--json"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    p = json.loads(done.stdout)["predictions"]
    assert p["paired_studies"] == 120 and p["only_one_file"] == 0
    assert (p["model"]["auroc"], p["model"]["lower"], p["model"]["upper"]) == pytest.approx(auroc_ci(y, a))
    assert p["baseline"]["auroc"] == pytest.approx(auroc_ci(y, b)[0])
    assert p["p_delong"] == pytest.approx(delong_test(y, a, b))
    assert "Prediction files" in (tmp_path / "out" / "report.html").read_text()
    bad = subprocess.run([sys.executable, "-m", "cmr_search.cli", "eval", "--predictions", str(tmp_path / "missing.csv"),
                          "--out", str(tmp_path / "out2")], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "missing.csv" in bad.stderr


def test_cmr_eval_with_an_external_site(trained_store, ingested, tmp_path):
    """Heads fitted on store A, scored on store B (embedded with A's encoder on the way):
    the paper's internal-vs-external table, columns of one site only listed."""
    import pyarrow.compute as pc

    from cmr_search.encoder.registry import EncoderRegistry
    from cmr_search.store import ClipStore

    root, model_id = trained_store
    site_a = copy_store(root, tmp_path / "site_a" / "store")
    site_b = copy_store(ingested[0].root, tmp_path / "site_b" / "store")
    clips = ClipStore.open(site_b)  # site B records no hcm, and a column of its own
    labels = clips.db.open_table("labels").to_arrow().drop_columns(["hcm"])
    labels = labels.append_column("troponin", pc.multiply(labels["lvef"], 0.1))
    clips.db.drop_table("labels")
    clips.db.create_table("labels", labels)
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "cmr_search.cli", "eval", "--store", str(site_a), "--external",
                           str(site_b), "--out", str(out), "--baseline", "none", "--fractions", "1", "--seeds", "1",
                           "--map", "pca", "-k", "3", "--json"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ext = json.loads(done.stdout)["external"]
    assert ext["model_id"] == model_id and set(ext["sites"]) == {"internal", "site_b"}
    internal, external = ext["sites"]["internal"], ext["sites"]["site_b"]
    assert external["lvef"]["n"] == 10 and internal["lvef"]["n"] < 10  # every labelled study vs the test split
    assert external["lvef"]["mae"] > 0 and "hcm" not in external.get("disease", {})
    assert ext["columns"]["site_b"] == {"only_internal": ["hcm"], "only_external": ["troponin"]}
    assert external["retrieval"]["pool"] == 10 and external["retrieval"]["common_pool"] == 10
    assert external["gap"]["lvef_mae_ratio"] == pytest.approx(external["lvef"]["mae"] / internal["lvef"]["mae"])
    # B was embedded with A's encoder, registered there, without becoming B's default
    assert EncoderRegistry(site_b).card(model_id)["origin"] == "imported" and EncoderRegistry(site_b).default is None
    page = (out / "report.html").read_text()
    assert "External validation" in page and "site_b" in page and "troponin" in page
    bad = subprocess.run([sys.executable, "-m", "cmr_search.cli", "eval", "--store", str(site_a), "--external",
                          str(tmp_path / "nowhere"), "--baseline", "none"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "is not a store" in bad.stderr
