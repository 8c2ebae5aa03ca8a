"""Request and response models of the API (they are also its OpenAPI schema)."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from cmr_search.store.clip_store import sql_quote

__all__ = [
    "ERRORS", "KEY_ERRORS", "ClusterList", "ErrorBody", "Filters", "HeadInfo", "HitOut", "MatchExplanation", "NeighborList",
    "Prediction", "QueryFinding", "SearchResult", "StudyDetail", "TextHitOut", "TextQuery", "UploadResult", "ViewOut",
]

View = Literal["4CH", "3CH", "2CH", "SAX", "LVOT", "OTHER"]
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_DATE = "%Y%m%d"  # DICOM DA, as stored


class Filters(BaseModel):
    """Metadata conditions, all of which a result must meet. ``view`` searches view
    embeddings and returns each study once, at its best view of that kind."""

    model_config = ConfigDict(extra="forbid")

    view: View | None = None
    sex: Literal["F", "M", "O"] | None = None
    age_min: float | None = Field(None, ge=0, le=130)
    age_max: float | None = Field(None, ge=0, le=130)
    site: str | None = Field(None, max_length=200)
    vendor: str | None = Field(None, max_length=200)
    date_from: date | None = None
    date_to: date | None = None
    label_min: dict[str, float] = Field(default_factory=dict, description="label column -> lowest value, e.g. {\"lvef\": 50}")
    label_max: dict[str, float] = Field(default_factory=dict, description="label column -> highest value, e.g. {\"lvef\": 35}")
    label_equals: dict[str, float | str] = Field(default_factory=dict, description="label column -> value, e.g. {\"lv_thrombus\": 1}")

    @field_validator("label_min", "label_max", "label_equals")
    @classmethod
    def _column_names(cls, value: dict) -> dict:
        for name in value:
            if not _COLUMN.match(name):
                raise ValueError(f"label column {name!r}: letters, digits and '_' only")
        return value

    def where(self) -> str | None:
        """The SQL condition these filters mean (values quoted, column names checked), or None."""
        parts = []
        for column in ("view", "sex", "site", "vendor"):
            if getattr(self, column) is not None:
                parts.append(f"{column} = '{sql_quote(str(getattr(self, column)))}'")
        if self.age_min is not None:
            parts.append(f"age >= {self.age_min}")
        if self.age_max is not None:
            parts.append(f"age <= {self.age_max}")
        if self.date_from is not None:
            parts.append(f"study_date >= '{self.date_from.strftime(_DATE)}'")
        if self.date_to is not None:
            parts.append(f"study_date <= '{self.date_to.strftime(_DATE)}'")
        parts += [f'"{c}" >= {float(v)}' for c, v in self.label_min.items()]
        parts += [f'"{c}" <= {float(v)}' for c, v in self.label_max.items()]
        parts += [f'"{c}" = ' + (f"'{sql_quote(v)}'" if isinstance(v, str) else str(float(v)))
                  for c, v in self.label_equals.items()]
        return " AND ".join(parts) or None


class TextQuery(BaseModel):
    """A text-to-scan search."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, max_length=1000, examples=["severe LV dilatation with apical thrombus"])
    k: int = Field(10, ge=1, le=10_000)
    filters: Filters = Field(default_factory=Filters)
    explain: bool = Field(True, description="say for each hit which findings of the query its report (or, "
                                            "without a report, a head) states; false skips it")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():  # refused before it reaches the encoder's batch
            raise PydanticCustomError("blank_text", "the text is blank; describe the findings to look for")
        return value


class HitOut(BaseModel):
    """One study in a result list."""

    study_uid: str
    score: float = Field(description="cosine similarity to the query, -1..1")
    views_present: list[str] = []
    view: str | None = Field(None, description="best-matching view (view-filtered searches)")
    slice_index: int | None = None
    clip_id: str | None = None
    sex: str | None = None
    age: float | None = None
    vendor: str | None = None
    site: str | None = None
    study_date: str | None = None
    links: dict[str, str] = {}
    viewer_url: str | None = Field(None, description="the study in the archive's own viewer (set when the service "
                                                     "has a viewer_url template)")


Verdict = Literal["match", "contradicts", "grade_differs", "conflicting", "not_stated", "unknown"]


class MatchExplanation(BaseModel):
    """What a hit's stored report, or without one a registered head, says of one finding of
    the query. It marks the hit; it never moves or hides it."""

    finding: str = Field(description="the finding's name, as its label column: lv_dilatation, lv_thrombus, ...")
    asked: str = Field(description="what the query asks, in the lexicon's words: 'severe LV dilatation', 'no LV thrombus'")
    verdict: Verdict = Field(description="match; contradicts (states the opposite); grade_differs (present at "
                                         "another grade); conflicting (the report states both); not_stated (the "
                                         "report does not name it); unknown (no report, and no head predicts it)")
    source: str | None = Field(None, description="'report', or 'head <name>' for a study without a report; null: unknown")
    stated: str | None = Field(None, description="what the source says, in the lexicon's words")
    asked_grade: str | None = Field(None, description="the grade the query asks ('severe', 'small', ...)")
    stated_grade: str | None = Field(None, description="the grade the source states")
    evidence: list[str] = Field([], description="the report's phrases that state it")
    opposite: list[str] = Field([], description="a conflicting report's phrases that state the opposite")
    label: str | None = Field(None, description="the head's label column")
    probability: float | None = Field(None, description="a classification head's probability")
    value: float | None = Field(None, description="a regression head's prediction, in label units")


class QueryFinding(BaseModel):
    """One finding the text query names, as the findings parser read it."""

    finding: str
    present: bool = Field(description="false: the query asks for its absence ('no LV thrombus')")
    grade: str | None = None
    asked: str = Field(description="the finding in the lexicon's words")
    text: list[str] = Field(description="the query's words for it")


class TextHitOut(HitOut):
    """A hit of a text query, with what its report or a head says of the query's findings."""

    explanation: list[MatchExplanation] = Field([], description="one entry per finding of ``findings``")


class SearchResult(BaseModel):
    """Studies ranked by similarity to a text query."""

    model_id: str
    query: str
    k: int
    level: Literal["studies", "views"]
    findings: list[QueryFinding] = Field([], description="the findings read from the query (empty when it names "
                                                         "none the lexicon knows, or with explain=false)")
    hits: list[TextHitOut]


class NeighborList(BaseModel):
    """The nearest other studies to one study."""

    model_id: str
    study_uid: str
    k: int
    level: Literal["studies", "views"]
    hits: list[HitOut]


class ViewOut(BaseModel):
    """One view (clip) of a study."""

    clip_id: str
    view: str
    slice_index: int | None = None
    n_slices: int | None = None
    frames: int
    source_frames: int | None = None
    rr_ms: float | None = None
    spacing_mm: float | None = None
    series_description: str | None = None
    attention: float | None = Field(None, description="the encoder's pooling weight of this view")
    cine: str = Field(description="URL of the cine loop as an animated image")


class SourceOut(BaseModel):
    """Where a study came from (no credential: a DICOMweb URL without its userinfo)."""

    archive: str = Field(description="the archive's display name: a DICOMweb base URL, 'DICOM push from AE "
                                     "<title>', or the file ingest's site label ('files' without one)")
    kind: Literal["dicomweb", "dicom-push", "files"]
    first_seen: datetime = Field(description="when the store first received it from this archive")
    last_seen: datetime = Field(description="when the store last received it from this archive")


class StudyDetail(BaseModel):
    """A study: metadata and its views with their cines."""

    study_uid: str
    model_id: str
    embedded: bool
    views_present: list[str]
    sex: str | None = None
    age: float | None = None
    vendor: str | None = None
    site: str | None = None
    study_date: str | None = None
    views: list[ViewOut]
    links: dict[str, str] = {}
    source: SourceOut | None = Field(None, description="where it came from; null when unknown (a store from "
                                                       "before sources were recorded, or an upload)")
    viewer_url: str | None = Field(None, description="the study in the archive's own viewer (set when the service "
                                                     "has a viewer_url template)")


class AttentionOut(BaseModel):
    """A head's attention on one view."""

    view: str
    slice_index: int | None = None
    clip_id: str | None = None
    weight: float


class Prediction(BaseModel):
    """One head's output for one study."""

    head: str
    task: str
    prediction: dict[str, float] = Field(description="probability (classification) or value in label units")
    positive: dict[str, bool] | None = Field(None, description="call at the head's validation Youden threshold")
    attention: list[AttentionOut] = []
    attention_source: Literal["head", "encoder_pooling"] | None = Field(
        None, description="'head': the MIL head's own attention; 'encoder_pooling': a head that reads the study "
                          "embedding, whose views weigh in as the encoder's attention pooling weighed them")


class PredictionList(BaseModel):
    """Every registered head's output for one study."""

    study_uid: str
    model_id: str
    predictions: list[Prediction]


class HeadInfo(BaseModel):
    """A registered head, from its card."""

    name: str
    task: str
    kind: str
    labels: list[str]
    model_id: str
    applicable: bool = Field(description="trained on this service's encoder, so it predicts here")
    metrics: dict = {}
    created_at: str | None = None


class UploadResult(BaseModel):
    """What became of an uploaded study."""

    study_uid: str
    model_id: str
    persisted: bool
    replaced: bool = Field(description="the store already held this study; its clips and embeddings were replaced")
    views: list[ViewOut] = []
    views_present: list[str]
    neighbors: list[HitOut]
    predictions: list[Prediction]
    skipped: list[str] = Field(default_factory=list, description="series left out by design (localizer, LGE, ...)")


class Cluster(BaseModel):
    """One HDBSCAN cluster of study embeddings."""

    cluster: int
    size: int
    exemplars: list[str] = Field(description="study_uids most central to the cluster")


class ClusterList(BaseModel):
    """Clusters of the study embeddings of one model, at one table version."""

    model_id: str
    studies: int
    noise: int
    version: int
    min_cluster_size: int
    clusters: list[Cluster]


class Withdrawal(BaseModel):
    """What ``DELETE /studies/{study_uid}`` removed."""

    study_uid: str
    rows_deleted: dict[str, int] = Field(description="table -> rows removed (clips, reports, labels, views, studies)")


class Health(BaseModel):
    """``/healthz``: the process answers."""

    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    """``/readyz``: the index and encoders are loaded."""

    status: Literal["ready"] = "ready"
    model_id: str
    # `cmr serve --sync`: the archive, cursor, cycles, studies added, last success and error
    sync: dict | None = None


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: ErrorDetail


#: the error responses the data routes document (OpenAPI)
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 422)}
#: what a route behind a key answers besides its own errors (no key, a key without the role)
KEY_ERRORS = {status: {"model": ErrorBody} for status in (401, 403)}
