"""``SearchService``: what one process of the API holds (the searcher with its indexes, the
encoders, the heads, the caches) and does. Routes stay thin; this class knows the store."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from cmr_search.api import schemas
from cmr_search.api.auth import KeyRing
from cmr_search.api.batching import MicroBatcher
from cmr_search.api.cines import CineCache
from cmr_search.api.errors import Cancelled, Conflict, InvalidUpload, NotFound, Unusable
from cmr_search.api.settings import ServeSettings, viewer_link
from cmr_search.api.uploads import UploadLimits, unpack_upload
from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout, write_atomic
from cmr_search.heads.data import VIEW_ORDER, Bags
from cmr_search.heads.registry import Head, HeadRegistry
from cmr_search.store.clip_store import sql_quote
from cmr_search.store.config import IndexConfig
from cmr_search.store.models import pull_model
from cmr_search.store.patients import patient_salt
from cmr_search.store.search import Hit, Searcher
from cmr_search.store.sources import Sources
from cmr_search.store.withdrawal import withdraw

if TYPE_CHECKING:
    from cmr_search.api.explain import Explainer

__all__ = ["SearchService"]

log = logging.getLogger(__name__)

_CLIP_COLUMNS = ["clip_id", "view", "slice_index", "n_slices", "frames", "source_frames", "rr_ms", "clip_spacing_mm",
                 "series_description", "ingested_at"]


def _links(study_uid: str) -> dict[str, str]:
    base = f"/studies/{quote(study_uid, safe='')}"
    return {"study": base, "neighbors": f"{base}/neighbors", "predictions": f"{base}/predictions"}


#: what a hit shows is the schema's to say: each field of ``HitOut`` that a hit or its metadata has
_HIT_FIELDS = tuple(name for name in schemas.HitOut.model_fields if name not in ("links", "viewer_url"))


def _hit_out(hit: Hit, kind: type[schemas.HitOut] = schemas.HitOut, viewer: str | None = None) -> schemas.HitOut:
    """A search hit as the API shows it (a missing or null value leaves the schema's default),
    linked to the archive's viewer through the ``viewer`` template when there is one."""
    m = hit.metadata
    return kind(**{name: value for name in _HIT_FIELDS
                   if (value := m[name] if name in m else getattr(hit, name, None)) is not None},
                links=_links(hit.study_uid), viewer_url=viewer_link(viewer, hit.study_uid))


def _stop_if(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled("client_closed", "the client closed the connection; the upload was stopped and nothing stored")


def _stamp(row: dict) -> int:
    """When a clip was written (ms): a re-ingested clip gets a new cine URL and cache file."""
    return int(row["ingested_at"].timestamp() * 1000) if row.get("ingested_at") else 0


def _view_order(row: dict) -> tuple:
    return VIEW_ORDER.get(row["view"], 9), row.get("slice_index") or 0, row["clip_id"]


class SearchService:
    """One store, one encoder model, served."""

    def __init__(self, settings: ServeSettings):
        if settings.store is None:
            raise InputError("no store given; pass --store DIR or set CMR_STORE")
        self.settings, self.root = settings, Path(settings.store)
        self.layout = StoreLayout(self.root)
        import torch

        torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.serve_workers))
        from cmr_search.encoder.embed import TextQueryEncoder

        self.searcher = Searcher(self.root, settings.model_id, IndexConfig.from_settings(settings),
                                 settings.check_interval(not self.layout.local), encode_text=TextQueryEncoder(self.root))
        self.model_id, self.store = self.searcher.model_id, self.searcher.store
        self.keys = KeyRing(self.root)
        if settings.api_key is not None:
            self.keys.register(settings.api_key.get_secret_value(), settings.api_key_role, "from CMR_API_KEY")
        self.registry = HeadRegistry(self.root)
        self.cines = CineCache(self.root, settings.cine_format)
        self.limits = UploadLimits(settings.max_upload_bytes, settings.max_upload_files, settings.max_unzipped_bytes,
                                   settings.max_zip_ratio)
        self._embedder = None
        self._explainer: Explainer | None = None
        self.encode_text = MicroBatcher(self.searcher.encode_text, max_batch=16, name="cmr-text")
        self._heads: dict[str, tuple[float, Head]] = {}
        self._lock = threading.Lock()  # lazy loads (embedder, heads, findings parser)
        # HDBSCAN can take seconds: on its own lock, so predictions and uploads do not wait for it
        self._cluster_lock = threading.Lock()
        self._write_lock = threading.Lock()  # this process writes one study at a time
        self.ready = threading.Event()

    # -- start-up ---------------------------------------------------------------------------
    def warm(self) -> None:
        """Open both indexes and the text tower so the first request is as fast as the rest,
        and remove the scratch a crashed server's uploads left."""
        self.store.clip_store.clean_scratch()
        self.searcher.warm()
        try:
            self.encode_text("warm-up")
        except InputError as error:  # a store embedded with the published checkpoint has no text tower
            log.warning("text search unavailable: %s", error)
        self.explainer()
        # Everything loaded so far (torch, the encoders, the index and its hit columns) lives as
        # long as the process. Left to the cyclic GC, every full collection walked it all: a
        # 120-160 ms stall of every thread, several times a minute under load, and the
        # neighbour p99 at 32 clients (measured, docs/BENCHMARKS.md). Frozen, a full
        # collection walks only what requests allocate.
        gc.freeze()
        self.ready.set()

    # -- search -----------------------------------------------------------------------------
    def search_text(self, query: schemas.TextQuery, vector: np.ndarray | None = None) -> schemas.SearchResult:
        """Text-to-scan (``vector``: the query already encoded by ``encode_text``). The query
        is taken as valid: its schema and the API's edge check it (k against ``max_k`` too).
        With the query's ``explain``, each hit says what its report, or a head, states of the
        query's findings."""
        where = query.filters.where()
        hits = self.searcher.by_vector(self.encode_text(query.query) if vector is None else vector, query.k, where)
        result = schemas.SearchResult(model_id=self.model_id, query=query.query, k=query.k,
                                      level=self.searcher.level_for(where),
                                      hits=[_hit_out(h, schemas.TextHitOut, self.settings.viewer_url) for h in hits])
        return self.explain(result) if query.explain else result

    def explain(self, result: schemas.SearchResult) -> schemas.SearchResult:
        """``result`` with the findings of its query and each hit's verdict on them. The
        verdicts mark hits, never filter or reorder them: the query's words are no filter."""
        from cmr_search.api.explain import asked_out, head_rows

        explainer = self.explainer()
        asked = explainer.query(result.query)
        why = explainer.explain(asked, [h.study_uid for h in result.hits], self.store.clip_store.reports,
                                lambda uids, labels: head_rows(self._loaded_heads(), self.store, self.model_id,
                                                               uids, labels))
        return result.model_copy(update={"findings": asked_out(asked), "hits": [
            h.model_copy(update={"explanation": w}) for h, w in zip(result.hits, why)]})

    def explainer(self) -> Explainer:
        """The findings parser of this service, built on first use (about 0.1 s; ``warm`` does it)."""
        # imported here: spaCy's import is paid only by a service that searches text
        from cmr_search.api.explain import Explainer

        with self._lock:
            if self._explainer is None:
                self._explainer = Explainer()
            return self._explainer

    def _require_study(self, study_uid: str) -> None:
        if not self.searcher.has_study(study_uid):
            raise NotFound("study_not_found", f"no study {study_uid} with embeddings of model {self.model_id}; "
                           "check the study_uid (GET /studies/{uid}) or embed it (`cmr embed`)")

    def neighbors(self, study_uid: str, k: int, filters: schemas.Filters,
                  exclude_same_patient: bool) -> schemas.NeighborList:
        """Scan-to-scan: the nearest other studies (``k`` checked at the edge, as for text)."""
        self._require_study(study_uid)
        where = filters.where()
        hits = self.searcher.by_study(study_uid, k, where, exclude_same_patient=exclude_same_patient)
        return schemas.NeighborList(model_id=self.model_id, study_uid=study_uid, k=k,
                                    level=self.searcher.level_for(where),
                                    hits=[_hit_out(h, viewer=self.settings.viewer_url) for h in hits])

    # -- studies ----------------------------------------------------------------------------
    def _clip_rows(self, study_uid: str, columns: list[str], clip_id: str | None = None) -> list[dict]:
        where = f"study_uid = '{sql_quote(study_uid)}'" + (f" AND clip_id = '{sql_quote(clip_id)}'" if clip_id else "")
        rows = self.store.clip_store.clips.search().where(where).select(columns).limit(None).to_list()
        return sorted(rows, key=_view_order) if "view" in columns else rows

    def _view_out(self, study_uid: str, row: dict, attention: float | None) -> schemas.ViewOut:
        cine = f"/studies/{quote(study_uid, safe='')}/views/{quote(row['clip_id'], safe='')}/cine?v={_stamp(row)}"
        return schemas.ViewOut(clip_id=row["clip_id"], view=row["view"], slice_index=row.get("slice_index"),
                               n_slices=row.get("n_slices"), frames=row["frames"], source_frames=row.get("source_frames"),
                               rr_ms=row.get("rr_ms"), spacing_mm=row.get("clip_spacing_mm"),
                               series_description=row.get("series_description"), attention=attention, cine=cine)

    def study(self, study_uid: str) -> schemas.StudyDetail:
        """Metadata and views of a stored study, where it came from and its viewer link."""
        clips = self._clip_rows(study_uid, _CLIP_COLUMNS + ["sex", "age", "vendor", "site", "study_date"])
        row = self.store.get_study(study_uid, self.model_id) if clips else None
        if not clips:
            raise NotFound("study_not_found", f"no study {study_uid} in this store; check the study_uid")
        attention = dict(zip(row["clip_ids"], row["attention"])) if row else {}
        first = clips[0]
        return schemas.StudyDetail(
            study_uid=study_uid, model_id=self.model_id, embedded=row is not None,
            views_present=sorted({c["view"] for c in clips}, key=lambda v: VIEW_ORDER.get(v, 9)),
            sex=first.get("sex"), age=first.get("age"), vendor=first.get("vendor"), site=first.get("site"),
            study_date=first.get("study_date"),
            views=[self._view_out(study_uid, c, attention.get(c["clip_id"])) for c in clips], links=_links(study_uid),
            source=Sources(self.store.clip_store).of(study_uid), viewer_url=viewer_link(self.settings.viewer_url, study_uid))

    def cine(self, study_uid: str, clip_id: str) -> Path:
        """The cached animated image of one view (made on first request)."""
        rows = self._clip_rows(study_uid, ["clip_id", "view", "frames", "rr_ms", "ingested_at"], clip_id)
        if not rows:
            raise NotFound("view_not_found", f"study {study_uid} has no view {clip_id}; "
                           "the study's views are listed by GET /studies/{uid}")
        row = rows[0]

        def make():
            _meta, clip = self.store.clip_store.get_clip(clip_id)
            cycle_ms = row.get("rr_ms") or 1000.0  # unknown heart rate: a one-second loop
            return clip, cycle_ms / len(clip)

        return self.cines.get(study_uid, clip_id, str(_stamp(row)), make)

    # -- heads ------------------------------------------------------------------------------
    def heads(self) -> list[schemas.HeadInfo]:
        """Every registered head; ``applicable`` when trained on this model's embeddings."""
        return [schemas.HeadInfo(name=c["name"], task=c["task"], kind=c["kind"], labels=c["labels"],
                                 model_id=c["model_id"], applicable=self._same_vectors(c["model_id"]),
                                 metrics=c.get("metrics", {}), created_at=c.get("created_at"))
                for c in self.registry.cards()]

    def _same_vectors(self, model_id: str) -> bool:
        """Whether a head fitted on ``model_id``'s embeddings reads this model's: the same
        model, or a text-aligned model and the video model whose vectors it shares."""
        return self.layout.vectors_model_id(model_id) == self.layout.vectors_model_id(self.model_id)

    def _loaded_heads(self) -> list[Head]:
        out = []
        for name in self.registry.names():
            path = self.registry.root / name / "card.json"
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:  # removed since names() listed it
                continue
            with self._lock:
                cached = self._heads.get(name)
                if cached is None or cached[0] != mtime:
                    cached = self._heads[name] = (mtime, self.registry.load(name))
            if self._same_vectors(cached[1].model_id):
                out.append(cached[1])
        return out

    @staticmethod
    def _predictions(heads: list[Head], bags: Bags, pooling: dict[str, float]) -> list[schemas.Prediction]:
        """Each head's rows for one study; ``pooling``: the encoder's attention weight of each
        of its clips, the per-view attention of a head that reads only the study embedding."""
        pooled = [{**v, "weight": pooling[v["clip_id"]]} for v in bags.view_names[0] if v["clip_id"] in pooling]
        out = []
        for head in heads:
            for row in head.predict_bags(bags):
                own = row.get("attention", [])
                out.append(schemas.Prediction(head=row["head"], task=row["task"], prediction=row["prediction"],
                                              positive=row.get("positive"), attention=own or pooled,
                                              attention_source="head" if own else "encoder_pooling" if pooled else None))
        return out

    def predictions(self, study_uid: str) -> schemas.PredictionList:
        """Every applicable head's output for a stored study."""
        from cmr_search.heads.data import load_bags

        self._require_study(study_uid)
        heads = self._loaded_heads()
        if not heads:
            return schemas.PredictionList(study_uid=study_uid, model_id=self.model_id, predictions=[])
        bags = load_bags(self.store, self.model_id, [study_uid])
        study = self.store.get_study(study_uid, self.model_id) or {}
        pooling = dict(zip(study.get("clip_ids") or [], study.get("attention") or []))
        return schemas.PredictionList(study_uid=study_uid, model_id=self.model_id,
                                      predictions=self._predictions(heads, bags, pooling))

    # -- clusters ---------------------------------------------------------------------------
    def clusters(self) -> schemas.ClusterList:
        """HDBSCAN clusters of the study embeddings, cached per model and table version."""
        from cmr_search.metrics.clusters import cluster_embeddings

        version, size = self.store.version("studies"), self.settings.cluster_min_size
        path = self.layout.clusters_cache / f"{self.model_id}-v{version}-m{size}.json"
        with self._cluster_lock:  # one computation at a time; the others then read its file
            if path.exists():
                return schemas.ClusterList.model_validate_json(path.read_text())
            rows = self.store.study_rows(self.model_id, ["study_uid", "vector"])
            if rows.num_rows > self.settings.cluster_max_studies:  # a fixed sample: the same answer every time
                keep = np.random.default_rng(0).choice(rows.num_rows, self.settings.cluster_max_studies, replace=False)
                rows = rows.take(pa.array(np.sort(keep)))
            uids = rows["study_uid"].to_pylist()
            result = cluster_embeddings(self.store.vectors(rows), min_cluster_size=size)
            out = schemas.ClusterList(
                model_id=self.model_id, studies=len(uids), noise=result.noise, version=version, min_cluster_size=size,
                clusters=[schemas.Cluster(cluster=c, size=n, exemplars=[uids[i] for i in result.exemplars[c]])
                          for c, n in sorted(result.sizes.items(), key=lambda kv: -kv[1])])
            write_atomic(path, out.model_dump_json())
            return out

    # -- writes -----------------------------------------------------------------------------
    def _embedder_for_uploads(self):
        from cmr_search.encoder.embed import Embedder

        with self._lock:
            if self._embedder is None:
                folder = self.layout.encoder(self.model_id)
                if not pull_model(self.layout, self.model_id):  # (on object storage: a copy from the bucket)
                    raise Conflict("no_encoder", f"model {self.model_id} is not registered in this store; uploads "
                                   "need the encoder the store was embedded with (`cmr embed --checkpoint PATH` "
                                   "registers it)")
                self._embedder = Embedder(folder)
            return self._embedder

    def upload(self, parts: list, persist: bool, cancelled: Callable[[], bool] = lambda: False) -> schemas.UploadResult:
        """Ingest and embed one new study; answer its neighbours and predictions; store it
        only when ``persist`` (clips, views, study: in that order, undone on failure).
        ``cancelled()`` (the client went away) is asked between stages, until storing starts."""
        from cmr_search.encoder.embed import embed_study
        from cmr_search.ingest import IngestConfig, ingest
        from cmr_search.store import ClipStore

        work = self.store.clip_store.scratch_dir("upload")
        try:
            files = unpack_upload(parts, work / "files", self.limits)
            _stop_if(cancelled)
            staging = ClipStore.open(work / "staging", self.store.clip_store.clip_config, create=True)
            salt = patient_salt(self.layout, self.settings.patient_salt)
            report = ingest([work / "files"], staging, IngestConfig(clip=staging.clip_config, workers=1), salt,
                            progress=False)
            _stop_if(cancelled)
            skipped = sorted({r["reason"] for r in report.skipped})
            if not report.studies_written:
                reasons = sorted({r["reason"] for r in report.rejected}) or skipped or ["no cine series found"]
                raise Unusable("no_cine_study", f"none of the {files} uploaded files gave a usable cine study: "
                               + "; ".join(reasons[:5]) + ". Upload the DICOM files of one cine CMR study")
            clip_rows = staging.clips.to_arrow().to_pylist()
            uids = {r["study_uid"] for r in clip_rows}
            if len(uids) != 1:
                raise InvalidUpload("several_studies", f"the upload holds {len(uids)} studies; upload one study at a time")
            study_uid = uids.pop()
            view_rows, study_row = embed_study(sorted(clip_rows, key=_view_order), self._embedder_for_uploads())
            replaced = False
            _stop_if(cancelled)
            if persist:
                replaced = self._persist(study_uid, clip_rows, view_rows, study_row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        vector = np.asarray(study_row["vector"], np.float32)
        neighbors = self.searcher.by_vector(vector, min(10, self.settings.max_k), exclude_studies=(study_uid,))
        heads = self._loaded_heads()
        attention = dict(zip(study_row["clip_ids"], study_row["attention"]))
        predictions = self._predictions(heads, self._bag(study_row, view_rows), attention) if heads else []
        views = ([self._view_out(study_uid, r, attention.get(r["clip_id"])) for r in sorted(clip_rows, key=_view_order)]
                 if persist else [])
        return schemas.UploadResult(study_uid=study_uid, model_id=self.model_id, persisted=persist, replaced=replaced,
                                    views=views, views_present=study_row["views_present"],
                                    neighbors=[_hit_out(h) for h in neighbors], predictions=predictions,
                                    skipped=skipped)

    def _persist(self, study_uid: str, clip_rows: list[dict], view_rows: list[dict], study_row: dict) -> bool:
        with self._write_lock:
            replaced = self.store.put_study(clip_rows, view_rows, study_row)
            if replaced:  # cines of the old clips: made anew on demand
                shutil.rmtree(self.layout.study_cache(study_uid), ignore_errors=True)
            self.searcher.refresh()
        return replaced

    def _bag(self, study_row: dict, view_rows: list[dict]) -> Bags:
        import torch

        views = torch.tensor(np.asarray([r["vector"] for r in view_rows], np.float32))[None]
        names = [[{"view": r["view"], "slice_index": r["slice_index"], "clip_id": r["clip_id"]} for r in view_rows]]
        return Bags(self.model_id, [study_row["study_uid"]], np.asarray([study_row["patient_key"]], dtype=object),
                    torch.tensor(np.asarray([study_row["vector"]], np.float32)), views,
                    torch.ones(1, len(view_rows), dtype=torch.bool), names)

    def delete(self, study_uid: str) -> schemas.Withdrawal:
        """Withdraw a study everywhere (clips, reports, labels, embeddings, indexes, caches)."""
        with self._write_lock:
            try:
                report = withdraw(self.store, study_uids=[study_uid])
            except InputError as error:
                raise NotFound("study_not_found", str(error)) from error
            self.searcher.refresh()
        return schemas.Withdrawal(study_uid=study_uid, rows_deleted=report.rows_deleted)

    def stats(self) -> dict[str, int]:
        """Row counts of the open indexes (for /metrics and /readyz)."""
        return {table: len(self.searcher.index(table)) for table in ("studies", "views")}
