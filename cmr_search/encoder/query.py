"""Text queries as the search embeds them: what a query asks of each finding, said to the
text tower as a contrast between that and its opposite.

Measured on held-out studies (docs/BENCHMARKS.md, "Text-to-scan"): a trained text tower
ranks studies for "no LV thrombus" much as it does for "LV thrombus". The two sentences'
embeddings share most of their direction, and a negated query ranks by that shared part,
so its top 10 held the finding as often as the pool does. The *difference* of the two
(the zero-shot prompt pair of `heads.zeroshot`) ranks the same studies well: AUROC 0.95
for LV thrombus, 0.99 for LV dilatation. So where the findings parser finds what a query
asks of a finding (present or denied, at a grade), the query's vector is that finding's
contrast, the unit difference between the lexicon's sentence saying it ("No LV thrombus.")
and the mean of the sentences saying otherwise ("LV thrombus."; for a grade, the other
grades and the denial too), summed over the query's findings, plus the query's own
embedding at ``FREE_TEXT_WEIGHT`` (the words the lexicon does not know still count). A
query that names no finding is embedded as it is. Nothing is filtered: every study keeps
its place in the ranking, by its similarity to that vector.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cmr_search.findings.lexicon import FINDINGS
from cmr_search.findings.parse import FindingParser, Statement, summarise

__all__ = ["FREE_TEXT_WEIGHT", "compose_queries", "finding_prompts"]

#: weight of a query's own embedding beside its findings' unit contrasts; with 1/8, "no LV
#: thrombus" put no thrombus in its top 10 where 1/2 put 0.38 of the prevalence (measured)
FREE_TEXT_WEIGHT = 0.125


def _sentence(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:] + "."


def finding_prompts(statement: Statement) -> tuple[str, list[str]]:
    """The lexicon's sentence saying what ``statement`` says of its finding, and the
    sentences saying otherwise: the denial for a stated finding (and the other grades for a
    graded one), the plain assertion for a denied one."""
    f = FINDINGS[statement.finding]
    if not statement.present:
        return _sentence(f.negative), [_sentence(f.phrase())]
    others = [_sentence(f.negative)]
    if f.graded and statement.grade:
        others += [_sentence(f.phrase(g)) for g in (1, 2, 3) if g != statement.grade]
    return _sentence(f.phrase(statement.grade)), others


def compose_queries(texts: list[str], encode: Callable[[list[str]], np.ndarray], parser: FindingParser,
                    free_text_weight: float = FREE_TEXT_WEIGHT) -> np.ndarray:
    """Unit query vectors [N, D] for ``texts``: each query's findings' contrasts plus its own
    embedding at ``free_text_weight``; a query naming no finding (or naming one both ways
    only) keeps its own embedding. ``encode`` embeds a list of texts (one call for the
    queries, one for every prompt they need)."""
    own = np.asarray(encode(list(texts)), np.float32)
    own = own / np.linalg.norm(own, axis=1, keepdims=True)
    asked = [[s for s in summarise(m).values() if not s.conflicting] for m in parser.parse_many(list(texts))]
    prompts: dict[str, None] = {}  # every sentence the queries' findings need, once
    for s in (s for said in asked for s in said):
        stated, others = finding_prompts(s)
        prompts |= dict.fromkeys([stated, *others])
    if not prompts:
        return own
    table = dict(zip(prompts, np.asarray(encode(list(prompts)), np.float32)))
    out = own.copy()
    for i, said in enumerate(asked):
        if not said:
            continue
        contrast = np.zeros_like(own[i])
        for s in said:
            stated, others = finding_prompts(s)
            c = table[stated] - np.mean([table[o] for o in others], axis=0)
            contrast += c / max(float(np.linalg.norm(c)), 1e-12)
        v = free_text_weight * own[i] + contrast
        out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
    return out
