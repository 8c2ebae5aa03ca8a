"""Findings, their negation and their grade in free-text report sentences.

A spaCy pipeline with no statistical model (nothing to download): a sentencizer, an
entity ruler over the phrase templates of `findings/lexicon.py` and ejection-fraction
values, and negspaCy's NegEx (Chapman et al., 2001) with its clinical termset, extended
by the "is absent" / "not seen" phrasing of imaging reports. The grade is the grade word
inside the phrase or next to it in its clause ("severely dilated", "effusion, small"), or
the band of a stated LVEF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import spacy
from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)
from negspacy.termsets import termset

from cmr_search.findings.lexicon import FINDINGS, GRADE_WORDS, TERMS, expand

__all__ = ["FindingParser", "Mention", "Statement", "agreement", "ef_grade", "summarise"]

# imaging reports deny with these too; NegEx's clinical termset is written for notes
_FOLLOWING = ["absent", "is absent", "are absent", "not seen", "is not seen", "not present",
              "not identified", "not demonstrated", "not visualised", "not visualized",
              "excluded", "has resolved", "resolved", "not detected", "not evident"]
_PRECEDING = ["there is no", "no definite", "no evidence for", "absent", "no significant",
              "no convincing", "no obvious", "no appreciable", "negative for", "nil"]
# an uncertain finding is not a denied one: "thrombus cannot be excluded" keeps it possible
_PSEUDO = ["not excluded", "cannot be excluded", "can not be excluded", "could not be excluded",
           "not be excluded", "cannot be ruled out", "can not be ruled out", "not ruled out",
           "cannot be entirely excluded", "cannot be completely excluded"]
# "no thrombus and severe LV dilatation": a new clause after "and" is not denied ("or"
# keeps the scope: "no thrombus or effusion")
_TERMINATION = ["with", "while", "whereas", "otherwise", "besides", "and", "apart from", ";"]
_BELOW = {"below", "under", "<", "less", "≤", "<="}
_CONJUNCTIONS = {"and", "or", "with", "but", "while", "whereas", ";", ":", "."}
_EF_LABEL = "ef_value"


def ef_grade(lvef: float) -> int:
    """LVEF band as a grade: 0 normal (>= 50 %), 1 mild (40-50), 2 moderate (30-40), 3 severe."""
    return 0 if lvef >= 50 else 1 if lvef >= 40 else 2 if lvef >= 30 else 3


@dataclass(frozen=True)
class Mention:
    """One finding named in the text: negated or not, its grade (1..3) where stated."""

    finding: str
    negated: bool
    grade: int | None
    start: int  # character span of the phrase in the text
    end: int
    sentence: int  # index of its sentence (``FindingParser.sentences``)
    text: str
    value: float | None = None  # a stated LVEF (percent)
    cue: tuple[int, int] | None = None  # character span of the grade word or LVEF number
    whole_study: bool = False  # from a phrase about the whole study ("normal study"), which denies every finding


@dataclass(frozen=True)
class Statement:
    """What a text says about one finding overall: present or denied, the grade, the phrases."""

    finding: str
    present: bool
    grade: int | None
    evidence: tuple[str, ...]
    conflicting: bool = False  # the text also says the opposite somewhere


class FindingParser:
    """The NegEx pipeline over the finding lexicon; build once, use for many texts.

    What it read of a text is kept (up to ``memo_size`` texts, then forgotten at once):
    training draws the same report sentences, claims and rewrites again and again, and the
    spaCy pass was most of a ``cmr train-text`` step (measured). A text's reading depends on
    the text alone, so the memo changes no result."""

    def __init__(self, memo_size: int = 50_000) -> None:
        self.memo_size = memo_size
        self._memo: dict[str, tuple[tuple[Mention, ...], tuple[tuple[int, int], ...]]] = {}
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
        patterns = []
        for i, term in enumerate(TERMS):
            for template in term.templates:
                patterns += [{"label": f"term{i}", "pattern": p} for p in expand(template)]
        number = {"LIKE_NUM": True}
        ef = [{"LOWER": {"IN": ["lvef", "ef"]}}, ]
        filler = {"LOWER": {"IN": ["of", "is", "was", "=", ":", "at", "estimated", "measured",
                                   "calculated", "approximately", "~", "about", "around", "below",
                                   "under", "<", "less", "than", "above", ">", "over", "greater",
                                   "≤", "≥", "<=", ">=", "of", "only"]}, "OP": "*"}
        for head in (ef, [{"LOWER": "ejection"}, {"LOWER": "fraction"}],
                     [{"LOWER": {"IN": ["lv", "left"]}}, {"LOWER": "ventricular", "OP": "?"},
                      {"LOWER": "ejection"}, {"LOWER": "fraction"}]):
            patterns.append({"label": _EF_LABEL, "pattern": [*head, filler, number, {"LOWER": {"IN": ["%", "percent"]}, "OP": "?"}]})
        ruler.add_patterns(patterns)
        terms = termset("en_clinical")
        terms.add_patterns({"following_negations": _FOLLOWING, "preceding_negations": _PRECEDING,
                            "termination": _TERMINATION, "pseudo_negations": _PSEUDO})
        nlp.add_pipe("negex", config={"neg_termset": terms.get_patterns()})
        self.nlp = nlp

    def parse(self, text: str) -> list[Mention]:
        """Every finding the text names, in order."""
        return self.parse_many([text])[0]

    def parse_many(self, texts: list[str]) -> list[list[Mention]]:
        """``parse`` over many texts (one spaCy pass)."""
        return [mentions for mentions, _ in self.read_many(texts)]

    def sentences(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the text's sentences, as ``Mention.sentence`` counts them."""
        return self.read_many([text])[0][1]

    def read_many(self, texts: list[str]) -> list[tuple[list[Mention], list[tuple[int, int]]]]:
        """Each text's mentions and sentence spans from one spaCy pass (a rewrite needs both)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if len(self._memo) + len(todo) > self.memo_size:
            self._memo = {}
        memo = self._memo  # this call's own reference: another thread may start a new memo
        for text, doc in zip(todo, self.nlp.pipe(todo)):
            memo[text] = (tuple(self._mentions(doc)), tuple((s.start_char, s.end_char) for s in doc.sents))
        return [(list(m), list(s)) for m, s in ((memo.get(t) or self._read(t)) for t in texts)]

    def _read(self, text: str) -> tuple[tuple[Mention, ...], tuple[tuple[int, int], ...]]:
        # only for a text another thread's new memo dropped between this call's two steps
        doc = self.nlp(text)
        return tuple(self._mentions(doc)), tuple((s.start_char, s.end_char) for s in doc.sents)

    def _mentions(self, doc) -> list[Mention]:
        sentence_of = {}
        for i, sent in enumerate(doc.sents):
            for t in range(sent.start, sent.end):
                sentence_of[t] = i
        out = []
        for ent in doc.ents:
            negex = bool(ent._.negex)
            sent = sentence_of[ent.start]
            if ent.label_ == _EF_LABEL:
                value = _number(ent)
                if value is None or not 5 <= value <= 90:
                    continue
                if any(t.lower_ in _BELOW for t in ent):  # "LVEF < 40%": just under the bound
                    value -= 0.5
                g = ef_grade(value)
                num = next(t for t in ent if t.like_num)
                out.append(Mention("reduced_lvef", (g == 0) != negex, g or None, ent.start_char,
                                   ent.end_char, sent, ent.text, value,
                                   (num.idx, num.idx + len(num.text))))
                continue
            term = TERMS[int(ent.label_[4:])]
            negated = term.normal != negex
            names = term.findings if negated or term.asserted is None else term.asserted
            cue = _grade_word(doc, ent)
            if negex and not term.normal and cue is not None:
                # a finding given its own grade is asserted, whatever negation precedes it in
                # the clause: "no LV thrombus, severe LV dilatation"
                negated = False
            cue = None if negated else cue
            for name in names:
                graded = cue is not None and FINDINGS[name].graded
                out.append(Mention(name, negated, GRADE_WORDS[cue.lower_] if graded else None,
                                   ent.start_char, ent.end_char, sent, ent.text, None,
                                   (cue.idx, cue.idx + len(cue.text)) if graded else None, term.whole_study))
        return out


def _number(ent) -> float | None:
    for tok in ent:
        if tok.like_num:
            try:
                return float(re.sub(r"[^0-9.]", "", tok.text))
            except ValueError:
                return None
    return None


def _grade_word(doc, ent):
    """The grade word in the phrase, else just before it in its clause, else right after it
    ("effusion, small"); of several ("mild to moderate") the worse, as a conclusion counts it."""
    found = [t for t in ent if t.lower_ in GRADE_WORDS]
    if not found:
        i = ent.start - 1
        while i >= max(ent.sent.start, ent.start - 3) and not found:
            tok = doc[i]
            if tok.ent_type_ or tok.lower_ in _CONJUNCTIONS or (tok.is_punct and tok.text != "-"):
                break
            if tok.lower_ in GRADE_WORDS:
                found.append(tok)
            i -= 1
    if not found:
        i = ent.end
        while i < ent.sent.end and doc[i].text in {",", "(", "-", "–"}:
            i += 1
        if i < ent.sent.end and doc[i].lower_ in GRADE_WORDS and not doc[i].ent_type_:
            found.append(doc[i])
    return max(found, key=lambda t: GRADE_WORDS[t.lower_]) if found else None


def summarise(mentions: list[Mention]) -> dict[str, Statement]:
    """Per finding, what the text says overall. A finding stated present anywhere counts as
    present (with its highest grade); a text that also denies it is marked conflicting."""
    out: dict[str, Statement] = {}
    for name in dict.fromkeys(m.finding for m in mentions):
        ms = [m for m in mentions if m.finding == name]
        present = [m for m in ms if not m.negated]
        grades = [m.grade for m in present if m.grade is not None]
        chosen = present or ms
        out[name] = Statement(name, bool(present), max(grades) if grades else None,
                              tuple(dict.fromkeys(m.text for m in chosen)),
                              conflicting=bool(present) and len(present) < len(ms))
    return out


def agreement(claim: dict[str, Statement], report: dict[str, Statement]) -> int:
    """Whether a report bears out a claim (both ``summarise``d): 1 when it says the same of
    every finding the claim names (present or denied, and the grade where both give one), 0
    when it says otherwise of any, -1 when it contradicts none but does not say (or says
    both ways) something the claim names. A claim that names no finding is -1."""
    if not claim:
        return -1
    known = True
    for name, c in claim.items():
        r = report.get(name)
        if r is None or r.conflicting or c.conflicting:
            known = False
        elif r.present != c.present:
            return 0
        elif c.present and c.grade is not None:
            if r.grade is None:
                known = False
            elif r.grade != c.grade:
                return 0
    return 1 if known else -1

