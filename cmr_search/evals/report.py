"""The evaluation's output: ``metrics.json`` (every number) and ``report.html`` (one
self-contained page: tables, figures embedded as data URIs, no script or CDN)."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import statistics
from pathlib import Path

__all__ = ["SECTIONS", "render_html", "write_report"]

# the page's sections in order: id -> heading (a test checks that each is present)
SECTIONS = {
    "summary": "Summary",
    "text-retrieval": "Text-to-scan retrieval",
    "scan-to-scan": "Scan-to-scan",
    "lvef": "LVEF",
    "disease": "Disease labels",
    "zero-shot": "Zero-shot labels",
    "efficiency": "Data efficiency",
    "external": "External validation",
    "registered-heads": "Registered heads",
    "clusters": "Clusters and maps",
    "reference": "The seed paper's statistics",
}

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;display:block;overflow-x:auto;margin:.5em 0 1em;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee;margin:.3em}.skip{color:#a00}nav a{margin-right:1em}
"""


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _table(rows: list[dict], columns: list[str] | None = None, headers: dict | None = None) -> str:
    """An HTML table of dict rows (columns: these keys, default those of the first row)."""
    if not rows:
        return '<p class="note">nothing to show</p>'
    columns = columns or [c for c in rows[0] if not isinstance(rows[0][c], (dict, list))]
    head = "".join(f"<th>{html.escape((headers or {}).get(c, c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(figures: dict[str, bytes], name: str, alt: str) -> str:
    if name not in figures:
        return ""
    data = base64.b64encode(figures[name]).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{SECTIONS[key]}</h2>{body}</section>'


def _summary(m: dict) -> str:
    run = m.get("run", {})
    rows = [{"item": k, "value": v} for k, v in (
        ("store", run.get("store")), ("studies (embedded by every model)", run.get("studies")),
        ("patients", run.get("patients")), ("views", run.get("views")),
        *((f"model: {name}", mid) for name, mid in run.get("models", {}).items()),
        ("phenotype labels", run.get("phenotypes")))]
    times = [{"stage": k, "seconds": v} for k, v in m.get("seconds", {}).items()]
    return (_table(rows) + "<h3>Time per stage</h3>" + _table(times)
            + '<p class="note">The baseline is the same architecture at random initialisation (it never saw a '
              "report); both are scored on the same held-out studies. Confidence intervals are DeLong's.</p>")


def _text_retrieval(m: dict) -> str:
    t = m.get("text_retrieval", {})
    parts = []
    if "own_report" in t:
        parts.append("<h3>Each study's own report as the query</h3>" + _table([t["own_report"]]))
    if "by_kind" in t:
        by_kind = t["by_kind"]
        rows = by_kind if isinstance(by_kind, list) else [{"kind": k, **v} for k, v in by_kind.items()]
        parts.append("<h3>Clinical phrase queries, by kind</h3>" + _table(rows))
    if "queries" in t:
        parts.append("<h3>Every phrase query</h3>" + _table(t["queries"]))
    if "negation" in t:
        parts.append("<h3>Negation: a negated query against its positive twin</h3>" + _table(t["negation"])
                     + '<p class="note">A model that ignores "no" returns the same studies for both (overlap near 1) '
                       "and fills the negated query's results with studies that have the finding.</p>")
    if "severity" in t:
        parts.append("<h3>Severity: true grades among each grade query's results</h3>" + _severity(t["severity"]))
    return "".join(parts) or '<p class="skip">no reports and no phrase queries for these labels</p>'


def _severity(severity: dict) -> str:
    """Per graded finding: the share of each true grade among each grade query's top k, and
    in the whole pool (what a ranking blind to severity would show)."""
    out = []
    for finding, block in severity.items():
        grades = block["grades"]
        rows = [{"query": q, **dict(zip(grades, f))} for q, f in zip(block["queries"], block["fractions"])]
        rows.append({"query": "(whole pool)", **dict(zip(grades, block["pool_fractions"]))})
        out.append(f"<p><b>{html.escape(finding)}</b>: exact grade in the top {block['k']}: "
                   f"{_fmt(block['exact'])} (chance {_fmt(block['chance_exact'])})</p>"
                   + _table(rows, ["query", *grades]))
    return "".join(out)


def _scan(m: dict) -> str:
    s = m.get("scan_to_scan", {})
    rows = [{"model": name, **{k: v for k, v in r.items() if not isinstance(v, (dict, list))}} for name, r in s.items()]
    per_label = []
    for name, r in s.items():
        for label, v in (r.get("per_label") or {}).items():
            per_label.append({"model": name, "label": label, **(v if isinstance(v, dict) else {"map": v})})
    lvef = [{"model": name, **r["lvef"]} for name, r in s.items() if r.get("lvef")]
    return (_table(rows) + '<p class="note">map: mean average precision at k of neighbours sharing a positive label '
            "with the query (or, for a study without findings, having none either); each study is a query against "
            "the others, its patient's other studies excluded.</p>"
            + ("<h3>LVEF of the neighbours</h3>" + _table(lvef)
               + '<p class="note">mae_neighbours: |own LVEF - mean LVEF of the k neighbours|; mae_random: the same '
                 "for k random other studies.</p>" if lvef else "")
            + ("<h3>Per phenotype</h3>" + _table(per_label) if per_label else ""))


def _lvef(m: dict, figures: dict) -> str:
    lvef = m.get("heads", {}).get("lvef")
    if not lvef:
        return '<p class="skip">no lvef label</p>'
    rows = []
    for name in ("contrastive", "baseline"):
        if name in lvef:
            r = lvef[name]
            h = r.get("hfref", {})
            rows.append({"model": name, "n": r["n"], "MAE": r["mae"], "SD of |error|": r["abs_error_sd"],
                         "RMSE": r["rmse"], "r": r["r"], "bias": r["bias"], "LoA low": r["loa_low"],
                         "LoA high": r["loa_high"], "HFrEF AUROC": h.get("auroc"), "lower": h.get("lower"),
                         "upper": h.get("upper"), "HFrEF cases": h.get("positives")})
    note = (f'<p class="note">HFrEF AUROC, contrastive vs baseline, paired DeLong p = {_fmt(lvef["hfref_delong_p"])}</p>'
            if "hfref_delong_p" in lvef else "")
    figs = "".join(_figure(figures, f"bland_altman_{n}", f"Bland-Altman {n}") for n in ("contrastive", "baseline"))
    return _table(rows) + note + figs + _figure(figures, "hfref_roc", "HFrEF ROC")


def _disease(m: dict) -> str:
    rows = m.get("heads", {}).get("disease")
    if not rows:
        return '<p class="skip">no 0/1 phenotype labels</p>'
    cols = ["label", "contrastive_positives", "contrastive_n", "contrastive_auroc", "contrastive_lower",
            "contrastive_upper", "baseline_auroc", "baseline_lower", "baseline_upper", "p_delong"]
    headers = {"contrastive_positives": "cases", "contrastive_n": "n", "contrastive_auroc": "AUROC",
               "contrastive_lower": "lower", "contrastive_upper": "upper", "baseline_auroc": "baseline AUROC",
               "baseline_lower": "lower", "baseline_upper": "upper", "p_delong": "p"}
    return (_table(rows, cols, headers) + '<p class="note">Held-out studies of one patient split; n/a where the test split '
            "holds only one class. p: paired two-sided DeLong test, contrastive vs baseline.</p>")


def _zero_shot(m: dict) -> str:
    z = m.get("zero_shot") or {}
    skipped = (f'<p class="note">no prompt pair in the findings lexicon for: {html.escape(", ".join(z["skipped"]))}</p>'
               if z.get("skipped") else "")
    if not z.get("labels"):
        return '<p class="skip">no 0/1 label with a prompt pair in the findings lexicon</p>' + skipped
    rows = []
    for r in z["labels"]:
        held = r.get("held_out", {})
        zs, head, every = held.get("zero_shot", {}), held.get("head", {}), r["all"]
        rows.append({"label": r["label"], "prompts": f"{r['positive']} / {r['negative']}",
                     "cases": zs.get("positives"), "n": _count(zs), "zs": zs.get("auroc"), "zs_lower": zs.get("lower"),
                     "zs_upper": zs.get("upper"), "head": head.get("auroc"), "head_lower": head.get("lower"),
                     "head_upper": head.get("upper"), "p": held.get("p_delong"), "all_cases": every["positives"],
                     "all_n": _count(every), "all": every["auroc"], "all_lower": every["lower"],
                     "all_upper": every["upper"]})
    headers = {"zs": "zero-shot AUROC", "zs_lower": "lower", "zs_upper": "upper", "head": "linear head AUROC",
               "head_lower": "lower", "head_upper": "upper", "all_cases": "all: cases", "all_n": "all: n",
               "all": "all: zero-shot AUROC", "all_lower": "lower", "all_upper": "upper"}
    return (_table(rows, list(rows[0]), headers)
            + '<p class="note">Zero-shot score: cos(study, positive prompt) - cos(study, negative prompt) with the '
              "model's own text tower; no head, no training labels. Beside it the linear disease head on the same "
              "held-out studies; p: paired two-sided DeLong test of the two. all: zero-shot over every labelled "
              "study (it trains on none).</p>" + skipped)


def _count(auroc: dict):
    """Labelled studies behind one ``labelled_auroc``."""
    return auroc["positives"] + auroc["negatives"] if auroc else None


def _efficiency(m: dict, figures: dict) -> str:
    rows = m.get("heads", {}).get("efficiency", [])
    summary = {}
    for r in rows:
        key = (r["task"], r["model"], r["fraction"])
        value = r.get("mae", r.get("mean_auroc"))
        summary.setdefault(key, []).append(value)
    table = [{"task": t, "model": mo, "fraction": f, "seeds": len(v),
              **({"median": statistics.median(ok), "min": min(ok), "max": max(ok)} if (ok := _finite(v)) else {})}
             for (t, mo, f), v in sorted(summary.items())]
    return (_figure(figures, "efficiency_lvef", "LVEF data efficiency")
            + _figure(figures, "efficiency_disease", "disease data efficiency")
            + _table(table) + '<p class="note">LVEF: MAE (lower is better); disease: mean AUROC over labels.</p>')


def _finite(values: list) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _external(m: dict) -> str:
    """The paper's internal-vs-external table: one row per site, the gap to the internal test."""
    ext = m.get("external")
    if not ext:
        return '<p class="skip">no external site (cmr eval --external OTHER_STORE)</p>'
    rows, labels = [], []
    for name, s in ext["sites"].items():
        lv, h, r, g = s.get("lvef", {}), s.get("lvef", {}).get("hfref", {}), s.get("retrieval", {}), s.get("gap", {})
        rows.append({"site": "internal test" if name == "internal" else name, "studies": lv.get("n"),
                     "LVEF MAE": lv.get("mae"), "SD of |error|": lv.get("abs_error_sd"), "bias": lv.get("bias"),
                     "LoA low": lv.get("loa_low"), "LoA high": lv.get("loa_high"), "HFrEF AUROC": h.get("auroc"),
                     "lower": h.get("lower"), "upper": h.get("upper"), "mean disease AUROC": s.get("mean_auroc"),
                     "own-report R@10": r.get("R@10"), "of": r.get("pool"),
                     f"R@10 in pools of {r.get('common_pool')}": r.get("common_R@10"),
                     "MAE ratio": g.get("lvef_mae_ratio"), "AUROC difference": g.get("mean_auroc_difference"),
                     "R@10 difference": g.get("r10_difference_common_pool")})
        for label, v in s.get("disease", {}).items():
            labels.append({"site": rows[-1]["site"], "label": label, "AUROC": v.get("auroc"), "lower": v.get("lower"),
                           "upper": v.get("upper"), "cases": v.get("positives"), "n": v.get("n")})
    columns = [{"site": k, **v} for k, v in ext.get("columns", {}).items() if v["only_internal"] or v["only_external"]]
    common = rows[0].keys() if rows else []
    note = ('<p class="note">Heads fitted on the internal store\'s training split (the same split and seed as above), '
            "scored on its test split and on every labelled study of each external store, embedded with the same "
            "encoder. Gaps: external MAE / internal MAE; mean AUROC difference over the labels both sites have; "
            "R@10 difference on pools of one size. Intervals are DeLong's.</p>")
    return (_table(rows, [c for c in common if any(r.get(c) is not None for r in rows)]) + note
            + "<h3>Per label</h3>" + _table(labels)
            + ("<h3>Label columns of one site only (not compared)</h3>"
               + _table(columns, ["site", "only_internal", "only_external"]) if columns else ""))


def _registered(m: dict) -> str:
    rows = []
    for h in m.get("registered_heads", []):
        for label, metrics in (h.get("test") or {}).items():
            rows.append({"head": h["name"], "kind": h["kind"], "label": label, "model_id": h["model_id"],
                         "test studies": h["test_studies"], "MAE": metrics.get("mae"), "AUROC": metrics.get("auroc")})
    return _table(rows) if rows else '<p class="note">no heads registered (`cmr heads train`)</p>'


def _clusters(m: dict, figures: dict) -> str:
    c = m.get("clusters", {})
    rows = []
    for name, r in c.items():
        h = r["hdbscan"]
        rows.append({"model": name, "clusters": h["clusters"], "noise": h["noise"], "ARI": h["ari"],
                     "ARI (clustered)": h["ari_clustered"], "purity": h["purity"],
                     "view kNN same view": r["view_neighbours"]["same_group"],
                     "view chance": r["view_neighbours"]["chance"],
                     "study kNN same phenotype": r["study_neighbours_same_phenotype"]["same_group"],
                     "phenotype chance": r["study_neighbours_same_phenotype"]["chance"]})
    return (_table(rows) + '<p class="note">ARI and purity against each study\'s main phenotype (its rarest positive '
            "label). View embeddings should not group by view plane: the k nearest views of a view sharing its "
            "plane far above chance means the space encodes the plane rather than the heart.</p>"
            + _figure(figures, "map_studies", "map of study embeddings") + _figure(figures, "map_views", "map of views"))


def _reference(m: dict) -> str:
    parts = []
    if m.get("predictions"):
        p = m["predictions"]
        rows = [{"file": p.get(f"{k}_file" if k == "baseline" else "file"), **p[k]} for k in ("model", "baseline")
                if k in p]
        parts.append("<h3>Prediction files</h3>" + _table(rows)
                     + (f"<p>paired DeLong p = {_fmt(p.get('p_delong', p.get('hfref_p_delong')))} over "
                        f"{p.get('paired_studies')} studies</p>" if "paired_studies" in p else ""))
    ref = m.get("reference")
    if not ref and not parts:
        return ('<p class="note">not run (`cmr eval --reference DIR` with the seed paper\'s prediction files, or '
                "`--predictions FILE`)</p>")
    if ref and ref.get("classification"):
        cols = ["label", "studies", "cases"] + [f"{k}{s}" for k in ("auc_contrastive", "auc_baseline", "p_val")
                                                for s in ("", "_theirs")] + ["reproduced", "explanation"]
        parts.append("<h3>Disease AUROC: ours (each study once, paired by id, pROC-exact DeLong) vs the authors' "
                     "table</h3>" + _table(ref["classification"], cols)
                     + '<p class="note">explanation: what reproduces their number (docs/evaluation_reference.md); '
                       "reproduced: recomputing their way gives their figures to 1e-6.</p>")
    if ref and ref.get("lvef"):
        lvef = ref["lvef"]
        rows = [{"cohort": c, "model": mo, **r}
                for c, models in lvef.items() if c != "paper" for mo, r in models.items() if isinstance(r, dict)]
        cols = ["cohort", "model", "n", "mae", "mae_sd", "rmse", "bias", "loa_low", "loa_high", "hfref_auroc",
                "hfref_lower", "hfref_upper"]
        parts.append("<h3>LVEF regression files</h3>" + _table(rows, cols)
                     + "<h3>The paper's printed LVEF figures against its own data</h3>" + _table(lvef.get("paper", [])))
    return "".join(parts)


def render_html(metrics: dict, figures: dict[str, bytes]) -> str:
    """The whole report as one HTML string."""
    body = {
        "summary": _summary(metrics), "text-retrieval": _text_retrieval(metrics), "scan-to-scan": _scan(metrics),
        "lvef": _lvef(metrics, figures), "disease": _disease(metrics), "zero-shot": _zero_shot(metrics),
        "efficiency": _efficiency(metrics, figures), "external": _external(metrics),
        "registered-heads": _registered(metrics), "clusters": _clusters(metrics, figures),
        "reference": _reference(metrics),
    }
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS.items())
    sections = "".join(_section(k, body[k]) for k in SECTIONS)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>cmr-search evaluation</title>'
            f"<style>{_STYLE}</style></head><body><h1>cmr-search evaluation</h1><nav>{nav}</nav>{sections}</body></html>")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN
    return x


def write_report(out_dir: Path, metrics: dict, figures: dict[str, bytes]) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``report.html`` into ``out_dir`` (each replaced atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("metrics.json", json.dumps(_jsonable(metrics), indent=1)),
                       ("report.html", render_html(metrics, figures))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
        paths.append(out_dir / name)
    return paths[0], paths[1]
