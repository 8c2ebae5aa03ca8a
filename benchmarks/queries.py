"""Does text-to-scan search answer what was asked? The CPU recipe (text tower's top layers
training, counterfactual hard negatives) against the locked-tower recipe it replaced, side
by side on the held-out studies of one cohort, over several seeds (issue 23).

    python benchmarks/queries.py --studies 400 [--seeds 0 1 2] [--json out.json]
    python benchmarks/queries.py --store DIR   # an ingested store with reports and labels
    python benchmarks/queries.py --parser-only # the findings parser on generated reports

Figures, held-out patients only (the same for every seed, ``split_seed`` 0):
- the phrase suite of ``evals/queries.py``: precision@10 of positive and combination
  queries (at min(10, relevant studies)); the negated finding's share of a negated query's
  top 10 over its prevalence in the pool; the asked grade's share of a severity query's
  top 10; the same for a small set of paraphrased queries in words the suite does not use;
  as the search embeds queries (their findings as contrasts, ``encoder/query.py``) and, as
  ``tower_*``, with the text tower's plain embedding of the query;
- the same suite figures with each query's vector replaced by a logistic regression fitted
  on the training studies (``ceiling_*``): what the video tower allows any text tower;
- zero-shot AUROC per binary label from the default prompt pair (`findings.FINDINGS`);
- the encoder figures of benchmarks/encoder.py: own-report R@k, LVEF probe MAE, phenotype
  probe AUROC; and the training minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from encoder import PHENOTYPES, evaluate, make_store, train_split

#: what the CPU recipe replaced: the whole text tower locked, its reports cached, 600 steps
LOCKED = {"frozen_layers": 6, "freeze_projection": True, "cached_variants": 8, "counterfactuals": 0}
LOCKED_STEPS = 600

# paraphrased clinical queries, none of them a string of the suite or of a report template:
# (text, kind, label spec {column: value}); kind "negated" scores the absence of every column
PARAPHRASES = [
    ("enlarged left ventricular cavity", "positive", {"lv_dilatation": 1}),
    ("LV systolic dysfunction", "positive", {"reduced_lvef": 1}),
    ("clot in the left ventricular apex", "positive", {"lv_thrombus": 1}),
    ("fluid around the heart", "positive", {"pericardial_effusion": 1}),
    ("no evidence of intracardiac thrombus", "negated", {"lv_thrombus": 1}),
    ("left ventricle not dilated", "negated", {"lv_dilatation": 1}),
    ("pericardial effusion absent", "negated", {"pericardial_effusion": 1}),
    ("markedly dilated LV", "severity", {"lv_dilatation_grade": 3}),
    ("mildly enlarged left ventricle", "severity", {"lv_dilatation_grade": 1}),
    ("akinetic apex complicated by LV thrombus", "combination", {"apical_akinesis": 1, "lv_thrombus": 1}),
    ("dilated and poorly contracting left ventricle", "combination", {"lv_dilatation": 1, "reduced_lvef": 1}),
]


def parser_accuracy(n: int = 1000, seed: int = 31) -> dict:
    """The findings parser against what the generator knows each report says: stated
    findings found with the right polarity, findings claimed that the report does not
    state, and grades against the labels."""
    from cmr_search.findings.parse import FindingParser, ef_grade, summarise
    from cmr_search.synth.labels import study_labels
    from cmr_search.synth.params import sample_study_params
    from cmr_search.synth.phantom import build_phantom
    from cmr_search.synth.reports import write_report

    reports = []
    for k in range(n):
        params = sample_study_params(np.random.default_rng([seed, k]), study_index=k)
        labels = study_labels(params, build_phantom(params).volumes)
        reports.append((labels, write_report(labels, params, np.random.default_rng([seed + 1, k]))))
    parser = FindingParser()
    t0 = time.perf_counter()
    parsed = parser.parse_many([r.text for _, r in reports])
    ms = 1000 * (time.perf_counter() - t0) / n
    stated = right = negated = negated_right = extra = graded = graded_right = 0
    for (labels, report), mentions in zip(reports, parsed):
        said = summarise(mentions)
        for finding, present in report.mentions:
            stated += 1
            ok = finding in said and said[finding].present == present
            right += ok
            if not present:
                negated += 1
                negated_right += ok
        for finding, st in said.items():
            mild = finding == "reduced_lvef" and st.present and st.grade == 1
            # a finding the report does not state one by one ("Normal study" denies all)
            # is spurious where the labels say otherwise
            unstated = finding not in dict(report.mentions) and finding not in report.omitted
            extra += unstated and not mild and st.present != bool(labels[finding])
        truth = {"lv_dilatation": int(labels["lv_dilatation_grade"]), "reduced_lvef": ef_grade(labels["lvef"])}
        for finding, g in truth.items():
            st = said.get(finding)
            if st is not None and st.present and st.grade is not None:
                graded += 1
                graded_right += st.grade == g
    return {"reports": n, "stated": stated, "found": right / stated, "negations": negated,
            "negations_found": negated_right / negated, "spurious_per_stated": extra / stated,
            "graded": graded, "grade_right": graded_right / graded, "ms_per_report": ms}


def _gain(spec: dict, labels: dict, kind: str) -> np.ndarray:
    cols = {c: np.asarray(labels[c], np.float64) for c in spec}
    if kind == "negated":
        return np.logical_and.reduce([cols[c] == 0 for c in spec]).astype(float)
    return np.logical_and.reduce([cols[c] == v for c, v in spec.items()]).astype(float)


def paraphrase_figures(vectors: np.ndarray, studies: np.ndarray, table: dict) -> dict:
    """The paraphrased queries' figures, by kind, for one vector per ``PARAPHRASES`` entry."""
    top = np.argsort(-(vectors @ studies.T), axis=1)[:, :10]
    by_kind: dict[str, list[float]] = {}
    for (_, kind, spec), t in zip(PARAPHRASES, top):
        if kind == "negated":
            has = 1 - _gain(spec, table, "negated")
            prev = has.mean()
            value = has[t].mean() / prev if prev else np.nan
        else:
            gain = _gain(spec, table, kind)
            rel = gain.sum()
            value = gain[t].sum() / min(10, rel) if rel else np.nan
        by_kind.setdefault(kind, []).append(value)
    return {f"para_{k}": float(np.nanmean(v)) for k, v in by_kind.items()}


def query_figures(model, corpus, test, labels: dict) -> dict:
    """``text_figures`` of a model: its text tower on its embeddings of the held-out studies."""
    from cmr_search.encoder.align import embed_studies

    model.eval()
    _, studies = embed_studies(model, corpus, test, torch.device("cpu"))

    def tower(texts: list[str]) -> np.ndarray:
        return model.text.encode(texts).float().numpy()

    return text_figures(tower, studies.numpy(), test, labels)


def text_figures(tower, s: np.ndarray, test, labels: dict) -> dict:
    """Phrase suite and paraphrases as the search embeds them (``encoder.query``: findings
    as contrasts), the same with the text tower's plain embeddings (``tower_``), and
    zero-shot, for a text tower (``texts -> [N, D]``) and the held-out studies' embeddings
    ``s`` [N, D] (in the order of ``test``)."""
    from sklearn.metrics import roc_auc_score

    from cmr_search.encoder.query import compose_queries
    from cmr_search.evals.queries import phrase_queries
    from cmr_search.findings import FINDINGS
    from cmr_search.findings.parse import FindingParser

    numeric = [c for c, v in labels[test[0].study_uid].items() if isinstance(v, (int, float)) and c != "study_uid"]
    table = {c: np.array([np.nan if labels[st.study_uid][c] is None else float(labels[st.study_uid][c])
                          for st in test]) for c in numeric}
    parser = FindingParser()
    with torch.inference_mode():
        queries = phrase_queries(table)
        suite, para = [q.text for q in queries], [t for t, _, _ in PARAPHRASES]
        out = suite_figures(compose_queries(suite, tower, parser), s, queries, table)
        out |= paraphrase_figures(compose_queries(para, tower, parser), s, table)
        plain = suite_figures(tower(suite), s, queries, table) | paraphrase_figures(tower(para), s, table)
        out |= {f"tower_{k}": v for k, v in plain.items()}
        # zero-shot: similarity to the positive prompt minus that to the negative one
        auc = {}
        for name in PHENOTYPES:
            y = table[name]
            ok = ~np.isnan(y)
            if 0 < y[ok].sum() < ok.sum():
                pos, neg = tower([FINDINGS[name].positive, FINDINGS[name].negative])
                score = s @ pos - s @ neg
                auc[name] = float(roc_auc_score(y[ok], score[ok]))
        out["zero_shot_AUROC"] = float(np.mean(list(auc.values())))
        out["zero_shot"] = auc
    return out


def suite_figures(vectors: np.ndarray, studies: np.ndarray, queries, table: dict) -> dict:
    """The phrase suite's goal figures for one vector per query."""
    from cmr_search.evals.queries import phrase_query_eval, severity_confusion

    rows = phrase_query_eval(vectors, studies, queries, table)
    sev = severity_confusion(vectors, studies, queries, table)
    out = {}
    for kind in ("positive", "combination"):
        group = [r for r in rows if r["kind"] == kind and r["relevant"] > 0]
        out[f"{kind}_P@10"] = float(np.mean([r["precision"] * r["k"] / min(r["k"], r["relevant"]) for r in group]))
    neg = [r for r in rows if r["kind"] == "negated" and r["finding_prevalence"] > 0]
    out["negated_rate_over_prevalence"] = float(np.mean([r["finding_rate"] / r["finding_prevalence"] for r in neg]))
    out["severity_exact"] = float(np.mean([v["exact"] for v in sev.values()]))
    return out


def probe_ceiling(model, corpus, train, test, labels: dict) -> dict:
    """What any text tower could reach with this video tower: each suite query's vector
    replaced by a logistic regression fitted to its relevance (exact grade, for severity) on
    the training studies' embeddings, which are unit vectors, so ranking by w·x is ranking by
    cosine with w. Supervised and fitted per query: an upper reference, not a zero-shot figure."""
    from sklearn.linear_model import LogisticRegression

    from cmr_search.encoder.align import embed_studies
    from cmr_search.evals.queries import phrase_queries

    model.eval()
    _, xtr = embed_studies(model, corpus, train, torch.device("cpu"))
    _, xte = embed_studies(model, corpus, test, torch.device("cpu"))

    def table_of(studies):
        cols = [c for c, v in labels[studies[0].study_uid].items() if isinstance(v, (int, float)) and c != "study_uid"]
        return {c: np.array([np.nan if labels[st.study_uid][c] is None else float(labels[st.study_uid][c])
                             for st in studies]) for c in cols}

    ttr, tte = table_of(train), table_of(test)
    queries = phrase_queries(tte)
    vectors = []
    for q in queries:
        y = (np.asarray(q.relevance(ttr)) >= 1.0).astype(int)
        if 0 < y.sum() < len(y):
            vectors.append(LogisticRegression(C=1.0, max_iter=2000).fit(xtr.numpy(), y).coef_[0])
        else:
            vectors.append(np.zeros(xtr.shape[1]))
    return {f"ceiling_{k}": v for k, v in suite_figures(np.array(vectors), xte.numpy(), queries, tte).items()}


def run(store: Path, recipe: str, seed: int, steps: int | None, work: Path) -> dict:
    """Train one recipe at one seed and score it."""
    from cmr_search.encoder.config import load_config

    cfg = load_config("mvit_xs_cpu")
    if recipe == "locked":
        cfg.text = replace(cfg.text, **LOCKED)
        cfg.train = replace(cfg.train, max_steps=LOCKED_STEPS)
    steps = steps or cfg.train.max_steps
    trainer, result, labels, train, test = train_split(store, cfg, seed, 0, steps, work / f"{recipe}-{seed}")
    figures = evaluate(trainer.model, trainer.corpus, train, test, labels, trainer.device)
    figures |= query_figures(trainer.model, trainer.corpus, test, labels)
    figures |= probe_ceiling(trainer.model, trainer.corpus, train, test, labels)
    figures["train_minutes"] = result.seconds / 60
    return {"recipe": recipe, "seed": seed, "steps": result.step, "held_out": len(test), **figures}


FIGURES = [("positive_P@10", True, 0.80), ("combination_P@10", True, 0.60),
           ("negated_rate_over_prevalence", False, 0.25), ("severity_exact", True, 0.60),
           ("zero_shot_AUROC", True, 0.85), ("para_positive", True, None), ("para_negated", False, None),
           ("para_severity", True, None), ("para_combination", True, None), ("R@1", True, None),
           ("R@10", True, None), ("lvef_MAE", False, None), ("mean_AUROC", True, None),
           ("tower_positive_P@10", True, None), ("tower_negated_rate_over_prevalence", False, None),
           ("tower_para_negated", False, None),
           ("ceiling_positive_P@10", True, None), ("ceiling_combination_P@10", True, None),
           ("ceiling_negated_rate_over_prevalence", False, None), ("ceiling_severity_exact", True, None),
           ("train_minutes", False, 15.0)]


def report(runs: list[dict]) -> None:
    """The side-by-side table: each figure's mean ± sd per recipe, and the goal."""
    recipes = list(dict.fromkeys(r["recipe"] for r in runs))
    print(f"\n{'figure':<30}" + "".join(f"{r:>22}" for r in recipes) + "   goal")
    for key, higher, goal in FIGURES:
        cells = []
        for recipe in recipes:
            v = np.array([r[key] for r in runs if r["recipe"] == recipe], float)
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            cells.append(f"{v.mean():>13.3f} ± {sd:<6.3f}")
        target = "" if goal is None else f"{'>=' if higher else '<='} {goal}"
        print(f"{key:<30}" + "".join(cells) + f"   {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an ingested store with reports and labels")
    parser.add_argument("--studies", type=int, default=400, help="cohort size when no --store is given")
    parser.add_argument("--keep-store", type=Path, help="copy the generated store here for later runs")
    parser.add_argument("--steps", type=int, help="training steps per run (default: each recipe's own)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=["locked", "cpu"], choices=["locked", "cpu"])
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--parser-only", action="store_true", help="only the findings parser's accuracy")
    args = parser.parse_args()
    acc = parser_accuracy()
    print(f"findings parser on {acc['reports']} generated reports: {acc['found']:.4f} of {acc['stated']} stated "
          f"findings found with their polarity ({acc['negations_found']:.4f} of {acc['negations']} negations), "
          f"{acc['spurious_per_stated']:.4f} spurious per stated, grade right {acc['grade_right']:.4f} "
          f"of {acc['graded']}; {acc['ms_per_report']:.2f} ms per report")
    if args.parser_only:
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.store:  # train in a copy: the benchmark must not leave runs in the user's store
            store = Path(shutil.copytree(args.store, work / "store"))
        else:
            store = make_store(args.studies, 11, work)
            if args.keep_store:
                shutil.copytree(store, args.keep_store)
        for seed in args.seeds:
            for recipe in args.recipes:
                runs.append(run(store, recipe, seed, args.steps, work))
                print(json.dumps({k: v for k, v in runs[-1].items() if not isinstance(v, dict)}), flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"parser": acc, "runs": runs}, indent=2))
    print(f"\n{len(runs)} runs on {torch.get_num_threads()} threads; held-out studies {[r['held_out'] for r in runs]}")
    report(runs)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
