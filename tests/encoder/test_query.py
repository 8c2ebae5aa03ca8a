"""Queries embedded through their findings' contrasts (encoder/query.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmr_search.encoder.query import FREE_TEXT_WEIGHT, compose_queries, finding_prompts
from cmr_search.encoder.text import TextConfig, TextEncoder
from cmr_search.findings.parse import FindingParser, agreement, summarise


@pytest.fixture(scope="module")
def parser():
    return FindingParser()


@pytest.fixture(scope="module")
def encode():
    torch.manual_seed(0)
    tower = TextEncoder(TextConfig(), dim=64)

    def run(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return tower.encode(list(texts)).numpy()

    return run


@pytest.mark.parametrize("query", ["no LV thrombus", "severe LV dilatation", "apical akinesis",
                                   "no pericardial effusion", "moderately impaired LV systolic function"])
def test_prompts_say_the_finding_and_its_opposites(parser, query):
    (asked,) = summarise(parser.parse(query)).values()
    stated, others = finding_prompts(asked)
    said = summarise(parser.parse(stated))
    assert agreement(said, {asked.finding: asked}) == 1  # the stated sentence says what was asked
    assert others and all(agreement(summarise(parser.parse(o)), {asked.finding: asked}) == 0 for o in others)


def test_a_query_is_its_findings_contrast_plus_its_own_words(parser, encode):
    own = encode(["no LV thrombus"])[0]
    stated, (other,) = finding_prompts(summarise(parser.parse("no LV thrombus"))["lv_thrombus"])
    a, b = encode([stated, other])
    c = (a - b) / np.linalg.norm(a - b)
    v = FREE_TEXT_WEIGHT * own / np.linalg.norm(own) + c
    got = compose_queries(["no LV thrombus"], encode, parser)[0]
    np.testing.assert_allclose(got, v / np.linalg.norm(v), atol=1e-6)


def test_words_without_a_finding_are_embedded_as_they_are(parser, encode):
    texts = ["a young athlete", "thrombus and no thrombus"]  # no finding; one named both ways
    got = compose_queries(texts, encode, parser)
    own = encode(texts)
    np.testing.assert_allclose(got, own / np.linalg.norm(own, axis=1, keepdims=True), atol=1e-6)


def test_a_denial_points_away_from_the_assertion(parser, encode):
    plain = encode(["LV thrombus", "no LV thrombus"])
    plain = plain / np.linalg.norm(plain, axis=1, keepdims=True)
    yes, no = compose_queries(["LV thrombus", "no LV thrombus"], encode, parser)
    assert float(plain[0] @ plain[1]) > 0.5  # what a text tower does with them: close together
    assert float(yes @ no) < 0.0  # composed: opposite ways
    assert np.allclose(np.linalg.norm(compose_queries(["severe LV dilatation with apical thrombus"], encode,
                                                      parser), axis=1), 1.0)
