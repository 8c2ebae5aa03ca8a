"""Counterfactual reports: the same text with one finding's statement changed.

Hard negatives for contrastive training (NegCLIP, Yuksekgonul et al., 2023; "CLIP doesn't
understand negation", Alhamoud et al., 2025): a study must score its own report above
the report with a present finding denied ("negate"), a denied finding asserted
("assert"), a grade moved ("regrade") or a finding left out ("drop"). Every sentence that
states the changed finding is rewritten, so the text never says both. A regrade swaps the
grade word (and a stated LVEF) in place; the other edits replace the sentence, and a
sentence that also states other findings is rewritten as one plain sentence per finding,
each keeping what the original said about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmr_search.findings.lexicon import ADVERBS, FINDINGS
from cmr_search.findings.parse import FindingParser, Mention, Statement, summarise

__all__ = ["EDITS", "Counterfactual", "counterfactuals", "edits_of", "plain_sentence", "rewrite"]

EDITS = ("negate", "assert", "regrade", "drop")
# an LVEF inside each grade's band (ef_grade): normal, mild, moderate, severe
_EF_BANDS = {0: (55, 70), 1: (41, 49), 2: (31, 39), 3: (15, 29)}


@dataclass(frozen=True)
class Counterfactual:
    """A rewritten report and the edit that made it."""

    text: str
    edit: str  # one of EDITS
    finding: str
    grade: int | None = None  # the grade a regrade or an assertion states


def edits_of(statements: dict[str, Statement]) -> list[tuple[str, str]]:
    """Every (edit, finding) the statements allow."""
    out = []
    for name, st in statements.items():
        if st.present:
            out += [("negate", name), ("drop", name)]
            if FINDINGS[name].graded and st.grade is not None:
                out.append(("regrade", name))
        else:
            out.append(("assert", name))
    return out


def counterfactuals(
    parser: FindingParser, text: str, rng: np.random.Generator, k: int = 2,
    mentions: list[Mention] | None = None, sentences: list[tuple[int, int]] | None = None,
) -> list[Counterfactual]:
    """Up to ``k`` counterfactuals of ``text`` with distinct edits, the kind of edit drawn
    first (so negations and regrades are not outnumbered by drops), then the finding.
    ``mentions`` and ``sentences``: the text already read (``FindingParser.read_many``)."""
    if mentions is None or sentences is None:
        read, sentences = parser.read_many([text])[0]
        mentions = read if mentions is None else mentions
    todo = edits_of(summarise(mentions))
    out: list[Counterfactual] = []
    while todo and len(out) < k:
        kinds = sorted({e for e, _ in todo}, key=EDITS.index)
        kind = kinds[int(rng.integers(len(kinds)))]
        options = [t for t in todo if t[0] == kind]
        edit, name = options[int(rng.integers(len(options)))]
        todo.remove((edit, name))
        made = rewrite(text, sentences, mentions, edit, name, rng)
        if made is not None:
            out.append(made)
    return out


def rewrite(
    text: str, sentences: list[tuple[int, int]], mentions: list[Mention], edit: str,
    finding: str, rng: np.random.Generator,
) -> Counterfactual | None:
    """``text`` with ``edit`` applied to ``finding``; None where the edit leaves no report."""
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; one of {EDITS}")
    own = [m for m in mentions if m.finding == finding]
    if not own:
        return None
    grade = None
    if edit == "regrade":
        old = summarise(own)[finding].grade
        grade = int(rng.choice([g for g in (1, 2, 3) if g != old]))
    elif edit == "assert" and FINDINGS[finding].graded:
        grade = int(rng.integers(1, 4))
    replaced: dict[int, str] = {}
    for s in sorted({m.sentence for m in own}):
        start, end = sentences[s]
        sentence = text[start:end]
        in_sentence = [m for m in mentions if m.sentence == s]
        if edit == "regrade":
            replaced[s] = _regrade(sentence, start, [m for m in in_sentence if m.finding == finding],
                                   grade, rng)
            continue
        others = summarise([m for m in in_sentence if m.finding != finding])
        parts = [plain_sentence(st.finding, st.present, st.grade, rng) for st in others.values()]
        if edit == "negate":
            parts.append(plain_sentence(finding, False, None, rng))
        elif edit == "assert":
            parts.append(plain_sentence(finding, True, grade, rng))
        replaced[s] = " ".join(parts)
    pieces, cursor = [], 0
    for s, new in sorted(replaced.items()):
        start, end = sentences[s]
        pieces.append(text[cursor:start])
        pieces.append(new)
        cursor = end
    pieces.append(text[cursor:])
    result = " ".join("".join(pieces).split())
    if not result or result == " ".join(text.split()):
        return None
    return Counterfactual(result, edit, finding, grade)


def plain_sentence(finding: str, present: bool, grade: int | None, rng: np.random.Generator) -> str:
    """One plain sentence stating a finding ("Moderate LV dilatation.", "The LV apex is
    akinetic."; "There is no LV thrombus.", "Pericardial effusion is absent."), its phrase
    and its form drawn at random, so no one wording marks a rewrite."""
    f = FINDINGS[finding]
    phrase = f.phrase(grade if present else None, int(rng.integers(len(f.synonyms) + 1)))
    if present:
        forms = ["{P}.", "There is {p}.", "{P} is seen.", "{P} is present.", "Evidence of {p}."]
    else:
        forms = ["No {p}.", "There is no {p}.", "No evidence of {p}.", "{P} is absent.",
                 "{P} is not seen.", "Without {p}.", "Negative for {p}."]
        if f.normal:
            forms.append(f.normal[0].upper() + f.normal[1:] + ".")
    form = forms[int(rng.integers(len(forms)))]
    return form.format(p=phrase, P=phrase[0].upper() + phrase[1:])


def _regrade(sentence: str, offset: int, own: list[Mention], grade: int,
             rng: np.random.Generator) -> str:
    """``sentence`` with the grade words (and a stated LVEF) of ``own`` moved to ``grade``."""
    cues = sorted({(m.cue, m.value is not None) for m in own if m.cue is not None}, reverse=True)
    for (start, end), is_value in cues:  # right to left, so earlier offsets stay valid
        a, b = start - offset, end - offset
        old = sentence[a:b]
        if is_value:
            low, high = _EF_BANDS[grade]
            new = str(int(rng.integers(low, high + 1)))
        else:
            new = _grade_word(old, own[0].finding, grade)
        sentence = sentence[:a] + new + sentence[b:]
    return sentence


def _grade_word(old: str, finding: str, grade: int) -> str:
    """The word for ``grade`` in the form of ``old``: adverb for an adverb, capitalised alike."""
    low = old.lower()
    if low == "poor":  # "poor systolic function": the only adjective that also says "impaired"
        new = f"{ADVERBS[grade]} impaired" if grade < 3 else "poor"
    elif low.endswith("ly"):
        new = ADVERBS[grade]
    else:
        new = FINDINGS[finding].scale[grade - 1]
    return new[0].upper() + new[1:] if old[:1].isupper() else new
