"""The findings a CMR report states, and the words reports use for them.

Each finding is named like its label column (`synth/labels.py`, a labels CSV), so what a
report says can be checked against a label and a query against a head. ``terms`` are
phrase templates for the finding as abnormal, ``normal_terms`` phrases that state it
absent ("normal LV size"); both expand into spaCy token patterns (`findings/parse.py`).

Template syntax, one token per space-separated item: ``a|b`` alternatives, a trailing
``?`` optional, and the macros of ``MACROS`` (multi-word alternatives such as ``LV`` for
"LV", "left ventricle", "left ventricular") in capitals.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = ["ADVERBS", "FINDINGS", "GRADE_WORDS", "MACROS", "TERMS", "Finding", "Term", "expand", "grade_name"]


@dataclass(frozen=True)
class Term:
    """Phrase templates that name ``findings``: abnormal (``normal=False``) or stated normal."""

    templates: tuple[str, ...]
    findings: tuple[str, ...]
    normal: bool = False
    # asserted, a general phrase names only some of its findings: "LV hypertrophy" is
    # concentric unless a report says asymmetric, while "no LV hypertrophy" denies both
    asserted: tuple[str, ...] | None = None
    # says something of the whole study ("normal study"), not of one structure
    whole_study: bool = False


@dataclass(frozen=True)
class Finding:
    """A finding, its canonical phrasing (prompts, rewrites) and whether it has a grade."""

    name: str
    positive: str  # the finding asserted, without a grade: "LV dilatation"
    negative: str  # the finding denied: "no LV dilatation"
    graded: bool = False
    scale: tuple[str, str, str] = ("mild", "moderate", "severe")  # grade 1..3 as adjectives
    with_grade: str = ""  # the finding at a grade: {adj} "moderate", {adv} "moderately"
    # other ways reports say it (a leading {adj} or {adv} takes the grade, or nothing)
    synonyms: tuple[str, ...] = ()
    normal: str = ""  # the finding denied by saying what is normal: "normal LV size"

    def phrase(self, grade: int | None = None, synonym: int = 0) -> str:
        """The finding asserted, at ``grade`` (1..3) where it has one; ``synonym`` 1.. picks
        one of ``synonyms`` instead of the canonical phrase."""
        template = (self.with_grade or self.positive) if synonym == 0 else self.synonyms[synonym - 1]
        if not (self.graded and grade):
            return template.replace("{adj} ", "").replace("{adv} ", "")
        return template.format(adj=self.scale[grade - 1], adv=ADVERBS[grade])


#: grade words -> grade 1..3; size words count for effusions (``Finding.scale``)
GRADE_WORDS: dict[str, int] = {
    "mild": 1, "mildly": 1, "slight": 1, "slightly": 1, "minimal": 1, "minimally": 1,
    "borderline": 1, "trivial": 1, "trace": 1, "small": 1,
    "moderate": 2, "moderately": 2,
    "severe": 3, "severely": 3, "marked": 3, "markedly": 3, "large": 3, "gross": 3,
    "grossly": 3, "poor": 3, "massive": 3, "massively": 3,
}
ADVERBS = {1: "mildly", 2: "moderately", 3: "severely"}
_GRADE = "|".join(GRADE_WORDS)
_ADVERBS = "|".join(w for w in GRADE_WORDS if w.endswith("ly"))

MACROS: dict[str, tuple[str, ...]] = {
    "LV": ("lv cavity|size?", "left -? ventricle|ventricular cavity|size?"),
    "RV": ("rv cavity|size?", "right -? ventricle|ventricular cavity|size?"),
    "LA": ("la", "left atrium|atrial"),
    "RA": ("ra", "right atrium|atrial"),
    "BE": ("is|was|are|appears|appear|remains|seems|looks",),
    "GRADE": (_GRADE,),
    "ADV": (_ADVERBS,),
    "DILATED": ("dilated|enlarged|dilatated|large|increased",),
    "DILATATION": ("dilatation|dilation|enlargement|distension",),
    "REDUCED": ("impaired|reduced|depressed|decreased|diminished|poor|abnormal",),
    "NORMAL": ("normal|preserved|normal-sized|unremarkable|good",),
    "FUNCTION": ("global|contractile? systolic? function|performance|contractility",
                 "ejection fraction"),
    "SIZE": ("cavity|in? size|sizes|dimensions|dimension|volume|volumes",),
}

FINDINGS: dict[str, Finding] = {f.name: f for f in (
    Finding("lv_dilatation", "LV dilatation", "no LV dilatation", graded=True,
            with_grade="{adj} LV dilatation", normal="normal LV size",
            synonyms=("{adv} dilated left ventricle", "{adv} enlarged LV",
                      "{adj} left ventricular enlargement", "{adj} dilatation of the left ventricle")),
    Finding("reduced_lvef", "impaired LV systolic function", "normal LV systolic function",
            graded=True, with_grade="{adv} impaired LV systolic function",
            normal="preserved LV systolic function",
            synonyms=("{adv} reduced left ventricular ejection fraction", "{adj} LV systolic dysfunction",
                      "{adv} depressed left ventricular function")),
    Finding("hcm", "hypertrophic cardiomyopathy", "no hypertrophic cardiomyopathy",
            synonyms=("asymmetric septal hypertrophy", "HCM")),
    Finding("concentric_lvh", "concentric LV hypertrophy", "no LV hypertrophy", graded=True,
            with_grade="{adj} concentric LV hypertrophy",
            synonyms=("{adj} concentric left ventricular hypertrophy", "{adj} concentric LVH")),
    Finding("dcm", "dilated cardiomyopathy", "no dilated cardiomyopathy", synonyms=("DCM",)),
    Finding("lv_thrombus", "apical LV thrombus", "no LV thrombus",
            synonyms=("left ventricular thrombus", "apical clot", "intracavitary thrombus",
                      "mural thrombus in the LV apex")),
    Finding("apical_akinesis", "apical akinesis", "no regional wall motion abnormality",
            normal="normal regional wall motion",
            synonyms=("akinesia of the apical segments", "akinetic LV apex", "apical dyskinesis")),
    Finding("rv_dilatation", "RV dilatation", "no RV dilatation", graded=True,
            with_grade="{adj} RV dilatation", normal="normal RV size",
            synonyms=("{adv} dilated right ventricle", "{adj} right ventricular enlargement")),
    Finding("rv_dysfunction", "impaired RV systolic function", "normal RV systolic function",
            graded=True, with_grade="{adv} impaired RV systolic function",
            normal="preserved RV systolic function",
            synonyms=("{adj} RV systolic dysfunction", "{adv} reduced right ventricular function")),
    Finding("la_dilatation", "left atrial dilatation", "normal left atrial size", graded=True,
            with_grade="{adj} left atrial dilatation", synonyms=("{adv} dilated left atrium",
                                                                  "{adj} LA enlargement")),
    Finding("ra_dilatation", "right atrial dilatation", "normal right atrial size", graded=True,
            with_grade="{adj} right atrial dilatation", synonyms=("{adv} dilated right atrium",
                                                                   "{adj} RA enlargement")),
    Finding("pericardial_effusion", "pericardial effusion", "no pericardial effusion",
            graded=True, scale=("small", "moderate", "large"),
            with_grade="{adj} pericardial effusion",
            synonyms=("{adj} circumferential pericardial effusion", "{adj} effusion in the pericardium")),
)}

TERMS: tuple[Term, ...] = (
    # left ventricular size
    Term(("GRADE? LV DILATATION", "GRADE? DILATATION of the LV", "LV BE? GRADE? DILATED",
          "GRADE? DILATED LV", "ADV? DILATED left ventricle|ventricle", "LV BE? GRADE? dilated|enlarged",
          "LV SIZE BE? GRADE? DILATED", "LV SIZE BE? GRADE? raised|elevated", "GRADE? increased LV SIZE",
          "LV end - diastolic volume|volumes BE? GRADE? DILATED", "LV end - diastolic volume|volumes BE? GRADE? raised|elevated",
          "GRADE? increased|raised|elevated lvedv|lvedvi|edv|edvi", "lvedv|lvedvi BE? GRADE? increased|raised|elevated"),
         ("lv_dilatation",)),
    Term(("NORMAL LV SIZE", "LV SIZE BE? normal", "LV SIZE BE? within normal limits", "LV BE not DILATED",
          "LV BE normal in? size?", "non - dilated LV", "non-dilated LV", "LV BE? of normal size",
          "LV not DILATED"),
         ("lv_dilatation",), normal=True),
    # "normal LV": size and function (the LV macro would also take "normal LV size")
    Term(("NORMAL lv", "NORMAL left ventricle"), ("lv_dilatation", "reduced_lvef"), normal=True),
    # left ventricular systolic function
    Term(("GRADE? REDUCED LV? FUNCTION", "LV FUNCTION BE? GRADE? REDUCED",
          "LV systolic dysfunction|impairment", "GRADE? LV systolic? dysfunction|impairment",
          "GRADE? REDUCED lvef|ef", "hfref", "lvef|ef BE? GRADE? REDUCED", "GRADE? global LV? hypokinesis|hypokinesia",
          "LV BE? GRADE? globally? hypokinetic", "GRADE? hypokinetic LV", "LV failure", "left heart failure"),
         ("reduced_lvef",)),
    Term(("NORMAL LV? FUNCTION", "LV? FUNCTION BE? NORMAL",
          "NORMAL lvef|ef", "lvef|ef BE? NORMAL", "LV FUNCTION BE? within normal limits"),
         ("reduced_lvef",), normal=True),
    # wall thickness
    Term(("hypertrophic cardiomyopathy|cardiomyopathy", "hcm", "hocm",
          "asymmetric septal? hypertrophy|thickening", "asymmetric hypertrophy|thickening of the interventricular? septum",
          "GRADE? septal hypertrophy", "hypertrophic obstructive cardiomyopathy",
          "GRADE? hypertrophied|thickened interventricular? septum", "interventricular? septum BE? GRADE? hypertrophied|thickened"),
         ("hcm",)),
    Term(("concentric LV? hypertrophy|lvh|thickening|remodelling|remodeling",
          "increased wall thickness in a concentric pattern", "GRADE? concentric lvh",
          "concentric left ventricular hypertrophy"),
         ("concentric_lvh",)),
    Term(("LV hypertrophy", "GRADE? lvh", "increased LV? wall thickness",
          "LV wall thickening", "thickened|thick LV? walls?", "LV walls BE thickened|hypertrophied",
          "myocardial hypertrophy"),
         ("concentric_lvh", "hcm"), asserted=("concentric_lvh",)),
    Term(("NORMAL LV? wall thickness|thicknesses", "LV? wall thickness BE? NORMAL",
          "no LV? wall thickening", "NORMAL LV? myocardial thickness"),
         ("concentric_lvh", "hcm"), normal=True),
    # dilated cardiomyopathy
    Term(("dilated cardiomyopathy|cardiomyopathy", "dcm", "non - ischaemic|ischemic dilated cardiomyopathy",
          "dilated cardiomyopathy phenotype"), ("dcm",)),
    # thrombus
    Term(("apical? LV? apical? mural? thrombus|thrombi|clot|thrombosis",
          "intracavitary|intraventricular|intracardiac|mural|apical|laminated thrombus|thrombi|clot",
          "thrombus in the LV? apex"),
         ("lv_thrombus",)),
    # a thrombus in an atrium or its appendage is not an LV thrombus (the longer match wins
    # and names no finding of this lexicon)
    Term(("LA appendage? thrombus|thrombi|clot|thrombosis", "RA appendage? thrombus|thrombi|clot|thrombosis",
          "laa|appendage thrombus|thrombi|clot|thrombosis", "thrombus|thrombi|clot in the LA appendage?",
          "thrombus|thrombi|clot in the RA appendage?", "thrombus|thrombi|clot in the laa|appendage"), ()),
    # regional wall motion at the apex
    Term(("apical akinesis|akinesia|dyskinesis|dyskinesia|aneurysm|hypokinesis",
          "akinesis|akinesia|dyskinesis|dyskinesia of the LV? apical segments|wall",
          "akinesis|akinesia|dyskinesis|dyskinesia of the LV? apex",
          "the? LV? apex BE akinetic|dyskinetic|aneurysmal", "apical segments BE akinetic|dyskinetic",
          "akinetic|dyskinetic|hypokinetic LV? apex|apical", "apical ballooning", "takotsubo|tako-tsubo",
          "LV apical? aneurysm", "regional wall motion abnormality|abnormalities",
          "wall motion abnormality|abnormalities", "regional wall motion BE abnormal",
          "rwma"),
         ("apical_akinesis",)),
    Term(("NORMAL regional? wall motion", "regional wall motion BE NORMAL"),
         ("apical_akinesis",), normal=True),
    # right ventricle
    Term(("GRADE? RV DILATATION", "GRADE? DILATATION of the RV", "RV BE? GRADE? DILATED", "GRADE? DILATED RV",
          "ADV? DILATED right ventricle"), ("rv_dilatation",)),
    Term(("GRADE? DILATED right heart", "GRADE? right heart DILATATION", "right heart BE? GRADE? DILATED"),
         ("rv_dilatation", "ra_dilatation")),
    Term(("GRADE? RV DILATATION and dysfunction|impairment",), ("rv_dilatation", "rv_dysfunction")),
    Term(("NORMAL RV SIZE", "RV SIZE BE? NORMAL", "RV BE? not DILATED", "RV BE normal in? size?",
          "non - dilated RV", "non-dilated RV"), ("rv_dilatation",), normal=True),
    Term(("GRADE? REDUCED RV FUNCTION", "RV FUNCTION BE? GRADE? REDUCED",
          "RV systolic? dysfunction|impairment", "GRADE? REDUCED rvef", "rvef BE? GRADE? REDUCED",
          "GRADE? RV hypokinesis|hypokinesia|failure", "RV BE? GRADE? hypokinetic", "GRADE? hypokinetic RV",
          "right heart failure"),
         ("rv_dysfunction",)),
    Term(("NORMAL RV FUNCTION", "RV FUNCTION BE? NORMAL", "NORMAL rvef"),
         ("rv_dysfunction",), normal=True),
    # "normal RV": size and function (not the RV macro, whose optional "size" would tie with "normal RV size")
    Term(("NORMAL rv", "NORMAL right ventricle", "rv BE? normal", "right ventricle BE? normal",
          "RV BE? normal in size and function", "RV BE? of normal size and function"),
         ("rv_dilatation", "rv_dysfunction"), normal=True),
    # both ventricles in one phrase
    Term(("NORMAL biventricular FUNCTION", "biventricular FUNCTION BE? NORMAL"),
         ("reduced_lvef", "rv_dysfunction"), normal=True),
    Term(("NORMAL biventricular SIZE", "biventricular SIZE BE? NORMAL"),
         ("lv_dilatation", "rv_dilatation"), normal=True),
    Term(("NORMAL biventricular SIZE and FUNCTION", "biventricular SIZE and FUNCTION BE? NORMAL"),
         ("lv_dilatation", "rv_dilatation", "reduced_lvef", "rv_dysfunction"), normal=True),
    Term(("biventricular DILATATION", "both ventricles BE? GRADE? DILATED"),
         ("lv_dilatation", "rv_dilatation")),
    Term(("GRADE? REDUCED biventricular FUNCTION", "biventricular systolic? dysfunction|impairment"),
         ("reduced_lvef", "rv_dysfunction")),
    # atria
    Term(("GRADE? LA DILATATION", "LA BE? GRADE? DILATED", "GRADE? DILATED LA", "ADV? DILATED left atrium"),
         ("la_dilatation",)),
    Term(("GRADE? RA DILATATION", "RA BE? GRADE? DILATED", "GRADE? DILATED RA", "ADV? DILATED right atrium"),
         ("ra_dilatation",)),
    Term(("GRADE? biatrial DILATATION", "both atria BE? GRADE? DILATED", "GRADE? DILATED atria",
          "GRADE? atrial DILATATION"), ("la_dilatation", "ra_dilatation")),
    Term(("NORMAL LA SIZE", "LA BE? normal in? size?", "LA BE not DILATED"), ("la_dilatation",), normal=True),
    Term(("NORMAL RA SIZE", "RA BE? normal in? size?", "RA BE not DILATED"), ("ra_dilatation",), normal=True),
    Term(("NORMAL atrial|biatrial SIZE", "both? atria BE? normal in? size?", "atria BE not DILATED",
          "atrial SIZE BE? NORMAL"), ("la_dilatation", "ra_dilatation"), normal=True),
    # a normal study denies every finding
    Term(("normal cardiac|cardiovascular|heart? mri|mr|cmr|study|scan|examination",
          "structurally normal heart", "normal heart", "no abnormality|abnormalities", "no cardiac abnormality|abnormalities"),
         tuple(FINDINGS), normal=True, whole_study=True),
    # pericardium
    Term(("GRADE? circumferential? pericardial effusion|fluid|collection",
          "GRADE? effusion in the pericardium|pericardial", "GRADE? circumferential? effusion",
          "GRADE? pericardial? effusions"), ("pericardial_effusion",)),
)


def grade_name(finding: str, grade: int) -> str:
    """The adjective for ``grade`` (1..3) of ``finding``: "moderate", or "small" for effusions."""
    return FINDINGS[finding].scale[grade - 1]


def _token(word: str) -> dict:
    optional = word.endswith("?") and len(word) > 1
    choices = (word[:-1] if optional else word).split("|")
    token = {"LOWER": choices[0] if len(choices) == 1 else {"IN": choices}}
    return {**token, "OP": "?"} if optional else token


def _alternatives(item: str) -> list[list[dict]]:
    """Token-pattern sequences for one template item (a macro may stand for several words)."""
    optional = item.endswith("?") and len(item) > 1
    word = item[:-1] if optional else item
    if word not in MACROS:
        return [[_token(item)]]
    out = [[_token(w) for w in alt.split(" ")] for alt in MACROS[word]]
    if optional:
        if len(out) == 1 and len(out[0]) == 1:
            return [[{**out[0][0], "OP": "?"}]]
        out.append([])
    return out


def expand(template: str) -> list[list[dict]]:
    """All spaCy token patterns one template stands for."""
    parts = [_alternatives(item) for item in template.split()]
    patterns = []
    for combo in itertools.product(*parts):
        pattern = [tok for seq in combo for tok in seq]
        if pattern and not all(tok.get("OP") == "?" for tok in pattern):
            patterns.append(pattern)
    return patterns
