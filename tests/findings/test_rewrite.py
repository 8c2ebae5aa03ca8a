"""Counterfactual reports say the opposite of the original about one finding, and the same
about every other."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cmr_search.findings.parse import FindingParser, summarise
from cmr_search.findings.rewrite import EDITS, counterfactuals, rewrite
from cmr_search.synth.labels import study_labels
from cmr_search.synth.params import sample_study_params
from cmr_search.synth.phantom import build_phantom
from cmr_search.synth.reports import write_report


@pytest.fixture(scope="module")
def parser() -> FindingParser:
    return FindingParser()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    out = []
    for k in range(80):
        params = sample_study_params(np.random.default_rng([21, k]), study_index=k)
        labels = study_labels(params, build_phantom(params).volumes)
        out.append(write_report(labels, params, np.random.default_rng([22, k])).text)
    # reports in wording the generator does not use
    out += [
        ("Findings: LV cavity is not dilated. LVEF is estimated at 58%. No evidence of intracardiac "
        "thrombus. Trivial pericardial effusion. The right ventricle appears mildly enlarged."),
        "Mild to moderate LV dilatation. Thrombus is absent. Left ventricular ejection fraction 34 %.",
        ("Impression: markedly dilated left ventricle with poor systolic function and a laminated "
        "apical clot."),
    ]
    return out


def _says(parser, text):
    return {k: (v.present, v.grade) for k, v in summarise(parser.parse(text)).items()}


def test_each_counterfactual_changes_exactly_its_finding(parser, texts):
    rng = np.random.default_rng(0)
    made = Counter()
    for text in texts:
        before = _says(parser, text)
        for cf in counterfactuals(parser, text, rng, k=4):
            after = _says(parser, cf.text)
            made[cf.edit] += 1
            expected = {"negate": (False, None), "assert": (True, cf.grade),
                        "regrade": (True, cf.grade), "drop": None}[cf.edit]
            assert after.get(cf.finding) == expected, (cf, text)
            if cf.edit == "regrade":
                assert cf.grade != before[cf.finding][1]
            for finding, said in before.items():
                if finding != cf.finding:
                    assert after.get(finding) == said, (finding, cf, text)
    assert set(made) == set(EDITS) and min(made.values()) >= 10, made


def test_regrade_rewrites_in_place(parser):
    text = "The LV is moderately dilated, with poor systolic function (LVEF 22%). No LV thrombus."
    mentions = parser.parse(text)
    sentences = parser.sentences(text)
    rng = np.random.default_rng(3)
    cf = rewrite(text, sentences, mentions, "regrade", "lv_dilatation", rng)
    assert cf.text == text.replace("moderately", {1: "mildly", 3: "severely"}[cf.grade])
    cf = rewrite(text, sentences, mentions, "regrade", "reduced_lvef", rng)
    assert _says(parser, cf.text)["reduced_lvef"] == (True, cf.grade)
    assert "22%" not in cf.text  # the stated LVEF moves with the words


def test_every_sentence_of_the_finding_changes(parser):
    text = "Apical LV thrombus. Impression: dilated LV and apical LV thrombus."
    cf = rewrite(text, parser.sentences(text), parser.parse(text), "negate", "lv_thrombus",
                 np.random.default_rng(0))
    assert _says(parser, cf.text) == {"lv_thrombus": (False, None), "lv_dilatation": (True, None)}


def test_nothing_to_rewrite(parser):
    text = "Comparison: none."
    assert counterfactuals(parser, text, np.random.default_rng(0)) == []
    assert rewrite(text, parser.sentences(text), [], "negate", "lv_thrombus",
                   np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="unknown edit"):
        rewrite(text, [], [], "invert", "lv_thrombus", np.random.default_rng(0))


def test_plain_sentences_say_what_they_are_asked_in_every_wording(parser):
    from cmr_search.findings.lexicon import FINDINGS
    from cmr_search.findings.rewrite import plain_sentence

    rng = np.random.default_rng(5)
    wordings = set()
    for finding, f in FINDINGS.items():
        for present, grade in [(False, None), (True, None)] + [(True, g) for g in (1, 2, 3) if f.graded]:
            for _ in range(25):
                text = plain_sentence(finding, present, grade, rng)
                wordings.add(text)
                assert _says(parser, text) == {finding: (present, grade)}, text
    assert len(wordings) > 600  # no one wording marks a rewrite
