"""Why a text-search hit matched: for each finding the query names, what the study's stored
report says about it, or, for a study without a report, what a registered head predicts.

An explanation marks a hit, it never moves or hides one: the ranking is the embedding's, and
filters stay the user's explicit ``filters``. Evidence is only ever the phrase the findings
lexicon matched in a report, widened to a grade word or a negation next to it (see
``evidence_phrase``); never a whole sentence, which could name a person or a date.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cmr_search.api.schemas import MatchExplanation, QueryFinding
from cmr_search.core.exceptions import InputError
from cmr_search.findings.lexicon import FINDINGS, grade_name
from cmr_search.findings.parse import FindingParser, Mention, Statement, ef_grade, summarise
from cmr_search.heads.data import load_bags
from cmr_search.heads.registry import Head
from cmr_search.store.embedding_store import EmbeddingStore

__all__ = [
    "Explainer",
    "Said",
    "asked_out",
    "evidence_phrase",
    "explain_hit",
    "head_labels",
    "head_rows",
    "head_says",
    "query_findings",
    "report_says",
    "verdict",
]

#: how many parsed reports a service keeps (a report is parsed in 1-2 ms; the hit lists of
#: one archive keep returning its same studies)
REPORT_CACHE = 4096

# A widened phrase takes at most this many words besides the matched phrase, each a plain
# lowercase word: a name, a date or a number is never carried into a response.
_MAX_GAP_WORDS = 4
_WORD = re.compile(r"\S+")
_SAFE = re.compile(r"[a-z][a-z-]*|[,\u2013-]")
_CLAUSE = re.compile(r"[.;:!?\n(),\[\]]")
_NEGATIONS = {"no", "not", "without", "absent", "absence", "negative", "nil", "free", "neither", "nor",
              "excluded", "resolved", "never", "none"}
_AFTER_NEGATION = {"seen", "identified", "demonstrated", "present", "visualised", "visualized", "detected",
                   "evident"}


@dataclass(frozen=True)
class Said:
    """What one source (a report, or a head) says about one finding."""

    finding: str
    present: bool
    grade: int | None
    source: str  # "report" or "head <name>"
    evidence: tuple[str, ...] = ()  # the report's phrases saying it
    opposite: tuple[str, ...] = ()  # a conflicting report's phrases saying the opposite
    label: str | None = None  # the head's label column
    probability: float | None = None  # a classification head's probability
    value: float | None = None  # a regression head's value, in label units


def query_findings(mentions: list[Mention]) -> dict[str, Statement]:
    """What the query asks of each finding it names. A query that names a finding both ways
    ("no thrombus ... thrombus") asks nothing clear of it, so that finding is left out."""
    return {name: s for name, s in summarise(mentions).items() if not s.conflicting}


def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text))


def _safe_words(words: list[re.Match]) -> bool:
    return all(_SAFE.fullmatch(w.group()) for w in words)


def _clause_before(text: str, start: int) -> int:
    cut = [m.end() for m in _CLAUSE.finditer(text, 0, start)]
    return cut[-1] if cut else 0


def _clause_after(text: str, end: int) -> int:
    m = _CLAUSE.search(text, end)
    return m.start() if m else len(text)


def _negation_before(text: str, start: int) -> int | None:
    """Start of the negation word shortly before ``start`` in its clause ("There is no |LV
    thrombus"), when every word from it to the phrase is a plain lowercase word."""
    lo = _clause_before(text, start)
    words = _words(text[lo:start])[-_MAX_GAP_WORDS:]
    for i in range(len(words) - 1, -1, -1):
        if words[i].group().lower() in _NEGATIONS:
            return lo + words[i].start() if _safe_words(words[i + 1:]) else None
    return None


def _negation_after(text: str, end: int) -> int | None:
    """End of the negation shortly after ``end`` in its clause ("LV thrombus| is not seen")."""
    words = _words(text[end:_clause_after(text, end)])[:_MAX_GAP_WORDS]
    last = max((i for i, w in enumerate(words) if w.group().lower() in _NEGATIONS), default=None)
    if last is None or not _safe_words(words[:last + 1]):
        return None
    if last + 1 < len(words) and words[last + 1].group().lower() in _AFTER_NEGATION:
        last += 1
    return end + words[last].end()


def evidence_phrase(text: str, mention: Mention) -> str:
    """The report's words for ``mention``: the matched phrase, widened to its grade word when
    that stands apart ("effusion, small") and, for a denied finding, to the negation
    ("No LV thrombus", "thrombus is not seen")."""
    start, end = mention.start, mention.end
    cue = mention.cue
    if cue is not None and not start <= cue[0] < cue[1] <= end:
        gap = _words(text[end:cue[0]] if cue[0] >= end else text[cue[1]:start])
        if len(gap) <= _MAX_GAP_WORDS and _safe_words(gap):
            start, end = min(start, cue[0]), max(end, cue[1])
    if mention.negated:
        before = _negation_before(text, start)
        after = None if before is not None else _negation_after(text, end)
        start, end = start if before is None else before, end if after is None else after
    return " ".join(text[start:end].split())


def report_says(text: str, mentions: list[Mention]) -> dict[str, Said]:
    """Per finding the report names: what it says overall (``summarise``) with its phrases;
    a report that says both keeps the phrases of each side."""
    out = {}
    for name, s in summarise(mentions).items():
        ms = [m for m in mentions if m.finding == name]
        stated = [evidence_phrase(text, m) for m in ms if m.negated != s.present]
        opposite = [evidence_phrase(text, m) for m in ms if m.negated == s.present] if s.conflicting else []
        out[name] = Said(name, s.present, s.grade, "report", tuple(dict.fromkeys(stated)),
                         tuple(dict.fromkeys(opposite)))
    return out


def head_labels(finding: str) -> tuple[str, ...]:
    """The label columns a head may predict that say something of ``finding``: the finding's
    own column (0/1), its grade (``lv_dilatation_grade``, 0..3) and, for a reduced LVEF, the
    LVEF itself."""
    return (finding, f"{finding}_grade") + (("lvef",) if finding == "reduced_lvef" else ())


def head_says(finding: str, row: dict) -> Said | None:
    """What one head's prediction row (``Head.predict_bags``) says of ``finding``, if anything.
    A classification head's call is at its card's threshold; a grade is the rounded value;
    an LVEF is graded by the report bands (``findings.parse.ef_grade``: under 50 % is reduced)."""
    source, pred = f"head {row['head']}", row["prediction"]
    if row["task"] != "regression" and finding in pred:
        positive = (row.get("positive") or {}).get(finding, pred[finding] >= 0.5)
        return Said(finding, bool(positive), None, source, label=finding, probability=pred[finding])
    label = f"{finding}_grade"
    if row["task"] == "regression" and label in pred:
        grade = min(3, max(0, round(pred[label])))
        return Said(finding, grade > 0, grade or None, source, label=label, value=pred[label])
    if row["task"] == "regression" and finding == "reduced_lvef" and "lvef" in pred:
        grade = ef_grade(pred["lvef"])
        return Said(finding, grade > 0, grade or None, source, label="lvef", value=pred["lvef"])
    return None


def verdict(asked: Statement, said: Said | None) -> str:
    """``match``, ``contradicts``, ``grade_differs``, ``conflicting`` (the report says both),
    ``not_stated`` (a report that does not name it) or ``unknown`` (nothing to go by)."""
    if said is None:
        return "unknown"
    if said.opposite:
        return "conflicting"
    if said.present != asked.present:
        return "contradicts"
    if asked.present and asked.grade is not None and said.grade is not None and said.grade != asked.grade:
        return "grade_differs"
    return "match"


def _phrase(finding: str, present: bool, grade: int | None) -> str:
    f = FINDINGS[finding]
    return f.phrase(grade) if present else f.negative


def _grade(finding: str, grade: int | None) -> str | None:
    return grade_name(finding, grade) if grade else None


def _best_head(asked: Statement, rows: list[dict]) -> Said | None:
    """Of the heads that say something of the finding, one with a grade when the query has
    one, else the first by head name."""
    said = [s for row in sorted(rows, key=lambda r: r["head"]) if (s := head_says(asked.finding, row))]
    return min(said, key=lambda s: asked.grade is not None and s.grade is None, default=None)


def explain_hit(asked: dict[str, Statement], report: dict[str, Said] | None,
                heads: list[dict]) -> list[MatchExplanation]:
    """One hit's verdict per query finding: from its report (``report_says``) where it has
    one, else from the heads' prediction rows for the study."""
    out = []
    for name, q in asked.items():
        if report is not None:
            said = report.get(name)
            kind = verdict(q, said) if said else "not_stated"
        else:
            said = _best_head(q, heads)
            kind = verdict(q, said)
        out.append(MatchExplanation(
            finding=name, asked=_phrase(name, q.present, q.grade), verdict=kind,
            source="report" if report is not None else said.source if said else None,
            stated=_phrase(name, said.present, said.grade) if said else None,
            asked_grade=_grade(name, q.grade if q.present else None),
            stated_grade=_grade(name, said.grade if said and said.present else None),
            evidence=list(said.evidence) if said else [], opposite=list(said.opposite) if said else [],
            label=said.label if said else None, probability=said.probability if said else None,
            value=said.value if said else None))
    return out


def head_rows(heads: list[Head], store: EmbeddingStore, model_id: str, study_uids: list[str],
              labels: set[str]) -> dict[str, list[dict]]:
    """Per study, the prediction rows of those ``heads`` that predict any of ``labels``."""
    heads = [h for h in heads if labels & set(h.card["labels"])]
    try:
        bags = load_bags(store, model_id, study_uids) if heads else None
    except InputError:  # withdrawn since the search found it: nothing left to predict from
        return {}
    out: dict[str, list[dict]] = {}
    for row in (row for head in heads for row in head.predict_bags(bags)):
        out.setdefault(row["study_uid"], []).append(row)
    return out


class Explainer:
    """The findings parser of one service (built once, about 0.1 s) and the reports it has
    parsed; ``explain`` gives a hit list its verdicts."""

    def __init__(self, size: int = REPORT_CACHE):
        self.parser = FindingParser()
        self.size = size
        self._parsed: OrderedDict[str, dict[str, Said]] = OrderedDict()
        self._lock = threading.Lock()  # the spaCy pipeline and the cache, across search threads

    def query(self, text: str) -> dict[str, Statement]:
        """What a query asks, finding by finding."""
        with self._lock:
            return query_findings(self.parser.parse(text))

    def report(self, text: str) -> dict[str, Said]:
        """What a report says, finding by finding (cached by its text)."""
        with self._lock:
            if text in self._parsed:
                self._parsed.move_to_end(text)
                return self._parsed[text]
            said = self._parsed[text] = report_says(text, self.parser.parse(text))
            if len(self._parsed) > self.size:
                self._parsed.popitem(last=False)
            return said

    def explain(self, asked: dict[str, Statement], study_uids: list[str],
                reports: Callable[[list[str]], dict[str, str]],
                predict: Callable[[list[str], set[str]], dict[str, list[dict]]]) -> list[list[MatchExplanation]]:
        """Each study's verdicts (in order). ``reports(uids)`` gives the stored report texts;
        ``predict(uids, labels)`` the prediction rows of the heads that predict any of
        ``labels``, for the studies without a report."""
        if not asked or not study_uids:
            return [[] for _ in study_uids]
        texts = reports(study_uids)
        bare = [u for u in study_uids if u not in texts]
        labels = {label for name in asked for label in head_labels(name)}
        rows = predict(bare, labels) if bare else {}
        return [explain_hit(asked, self.report(texts[u]) if u in texts else None, rows.get(u, []))
                for u in study_uids]


def asked_out(asked: dict[str, Statement]) -> list[QueryFinding]:
    """The query's findings as the response lists them."""
    return [QueryFinding(finding=name, present=q.present, grade=_grade(name, q.grade if q.present else None),
                         asked=_phrase(name, q.present, q.grade), text=list(q.evidence))
            for name, q in asked.items()]
