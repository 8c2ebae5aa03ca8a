"""``cmr embed``: every clip of a store -> the ``views`` table, every study -> ``studies``;
``encode_study`` and ``embed_study`` for a new study's clips (the search service's uploads)."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmr_search.core.exceptions import InputError
from cmr_search.core.layout import StoreLayout
from cmr_search.encoder.checkpoint import (
    has_text_tower,
    load_checkpoint,
    load_text_encoder,
    load_video_encoder,
    video_folder,
)
from cmr_search.encoder.video import preprocess_batch

__all__ = ["EmbedReport", "Embedder", "TextQueryEncoder", "embed_store", "embed_study", "encode_study"]

log = logging.getLogger(__name__)

# the columns a view row copies from its clip
VIEW_META = ["clip_id", "study_uid", "patient_key", "view", "slice_index", "sex", "age", "vendor", "site", "study_date"]


class TextQueryEncoder:
    """The text towers of a store's encoders, each loaded on first use: ``(model_id, texts) ->
    [N, 512]`` unit float32 embeddings. What a ``Searcher`` takes as its ``encode_text``."""

    def __init__(self, store_root: Path):
        self.layout = StoreLayout(store_root)
        self._towers: dict[str, torch.nn.Module] = {}
        self._lock = threading.Lock()
        self._parser = None

    def tower(self, model_id: str) -> torch.nn.Module:
        """The text tower of encoder ``model_id`` in this store."""
        with self._lock:
            if model_id not in self._towers:
                from cmr_search.encoder.registry import EncoderRegistry

                card = EncoderRegistry(self.layout.root).card(model_id)  # an unregistered model says how to fix it
                if not card["text_tower"]:
                    raise InputError(
                        f"model {model_id} ({card['origin']}, from {card['source'] or 'this store'}) is a vision "
                        "tower without a text tower, so it cannot embed a text query; search it by study "
                        "(`cmr search --study UID`), align a text tower to its stored embeddings (`cmr "
                        f"train-text --store {self.layout.root} --model-id {model_id}`, minutes on a CPU), or "
                        "search text with a model that has one (`cmr encoders list` shows which do)")
                self._towers[model_id] = load_text_encoder(self.layout.encoder(model_id))
            return self._towers[model_id]

    def plain(self, model_id: str, texts: list[str]) -> np.ndarray:
        """Texts embedded as the text tower reads them: zero-shot prompt pairs (a contrast
        already) and whole reports."""
        tower = self.tower(model_id)
        with torch.inference_mode():
            return tower.encode(list(texts)).float().numpy()

    def __call__(self, model_id: str, texts: list[str]) -> np.ndarray:
        """Queries embedded through their findings' contrasts (``encoder/query.py``)."""
        from cmr_search.encoder.query import compose_queries
        from cmr_search.findings.parse import FindingParser

        with self._lock:
            if self._parser is None:
                self._parser = FindingParser()
        return compose_queries(list(texts), lambda batch: self.plain(model_id, batch), self._parser)


class Embedder:
    """A loaded vision tower with its preprocessing and study pooling, ready for inference.

    From our checkpoint folder the study embedding uses the trained attention pooling; the
    published checkpoint has no pooling, so its study embedding is the normalised mean.
    """

    def __init__(self, checkpoint: Path, device: str | None = None, allow_partial: bool = False,
                 trust_pickle: bool = False, config: str | None = None, compile: bool = False,
                 compile_batch: int = 16):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # a text-aligned model's views and studies are its video model's
        checkpoint = video_folder(Path(checkpoint))
        if has_text_tower(checkpoint):  # our folder: the trained pooling too
            model, cfg, self.model_id, _ = load_checkpoint(checkpoint, text=False)
            self.video, self.pool, self.preprocess, self.dim = model.video, model, cfg.preprocess, cfg.dim
        else:
            # a vision tower alone (registered, or the published .ckpt; config: which
            # architecture a published .ckpt holds, default MViT-B 16x4)
            self.video = load_video_encoder(checkpoint, allow_partial=allow_partial, trust_pickle=trust_pickle,
                                            config=config)
            self.pool, self.preprocess, self.model_id = None, self.video.preprocess, self.video.model_id
            self.dim = self.video.video_proj.out_features
        self.video.to(self.device).eval()
        if self.pool is not None:
            self.pool.to(self.device).eval()
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        # torch.compile: 2.4x the bf16 throughput of MViT-B on an H200 after ~45 s of compiling
        # (docs/BENCHMARKS.md); clips go through in batches of one size so it compiles once
        self.compiled = torch.compile(self.video) if compile else None
        self.compile_batch = compile_batch

    @torch.inference_mode()
    def encode_clips(self, clips: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 clips [N, T, H, W] -> float32 [N, dim] on the CPU."""
        # uint8 to the device first: a twelfth of the bytes of the float 3-channel input
        x = preprocess_batch(torch.as_tensor(np.asarray(clips)).to(self.device), self.preprocess)
        with self.amp:
            if self.compiled is None:
                return self.video(x).float().cpu()
            out, b = [], self.compile_batch
            for i in range(0, len(x), b):
                chunk = x[i : i + b]
                n = len(chunk)
                if n < b:  # zero clips pad the batch; each clip's output depends on itself alone
                    chunk = torch.cat([chunk, chunk.new_zeros(b - n, *chunk.shape[1:])])
                out.append(self.compiled(chunk)[:n])
            return torch.cat(out).float().cpu()

    @torch.inference_mode()
    def pool_views(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One study's view embeddings [N, dim] -> (study embedding [dim], attention [N])."""
        if self.pool is None:
            return F.normalize(views.mean(0), dim=0), torch.full((len(views),), 1.0 / len(views))
        study, attention = self.pool.pool_study(views[None].to(self.device), torch.ones(1, len(views), dtype=torch.bool,
                                                                                         device=self.device))
        return study[0].float().cpu(), attention[0].float().cpu()


def _encode_batches(clips: np.ndarray, embedder: Embedder, batch_size: int) -> torch.Tensor:
    return torch.cat([embedder.encode_clips(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)])


def encode_study(clips: list[np.ndarray] | np.ndarray, embedder: Embedder | str | Path, batch_size: int = 16):
    """A new study's uint8 clips [N, T, H, W] -> (view embeddings [N, 512], study embedding
    [512], attention [N]) as numpy arrays. ``embedder``: a loaded ``Embedder`` (to encode
    many studies) or a checkpoint folder (``STORE/encoders/<model_id>``) for just this one."""
    if not isinstance(embedder, Embedder):
        embedder = Embedder(Path(embedder))
    clips = np.stack([np.asarray(c) for c in clips]) if isinstance(clips, list) else np.asarray(clips)
    if clips.ndim != 4 or len(clips) == 0:
        raise InputError(f"a study needs one or more clips [N, T, H, W]; got shape {clips.shape}")
    views = _encode_batches(clips, embedder, batch_size)
    study, attention = embedder.pool_views(views)
    return views.numpy(), study.numpy(), attention.numpy()


@dataclass
class EmbedReport:
    """What one ``cmr embed`` run did."""

    model_id: str
    clips_embedded: int
    clips_skipped: int  # already embedded with this model_id
    studies: int
    seconds: float
    default_model: str | None = None  # the store's default model after this run

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return dict(self.__dict__)


def embed_store(store_root: Path, checkpoint: Path, batch_size: int = 32, commit_every: int = 512,
                device: str | None = None, progress: bool = True, index_config=None,
                before_commit: Callable[[str], None] | None = None, set_default: bool | None = None,
                ray: str | None = None, **load_options) -> EmbedReport:
    """Embed the clips not yet embedded with this checkpoint's model_id (so a killed run
    resumes where its last commit ended), then pool every study of the model again.

    The checkpoint is registered in the store first (``EncoderRegistry``: a folder from
    elsewhere or the published file is kept under ``STORE/encoders/<model_id>``). The model
    becomes the store's default when ``set_default``, or (None) when the store has none yet.

    Each commit holds the store's write lock and keeps only rows derived from what is still
    stored as it was read (``EmbeddingStore.commit_views``, ``commit_studies``), so a study
    withdrawn or replaced while this runs gets no stale embedding. ``before_commit(what)``
    is called before each commit (``"views"``, ``"studies"``): the seam the interleaving
    tests pause a writer at.

    ``ray``: the clips are embedded by a pool of actors on that Ray cluster ("local" starts
    one here, "auto" joins the running one, or its address; ``encoder/cluster.py``), the
    commits and the study pooling staying here, so the store ends as this machine alone
    would leave it."""
    import time

    from cmr_search.encoder.data import ClipCorpus
    from cmr_search.encoder.registry import EncoderRegistry
    from cmr_search.store.clip_store import ClipStore
    from cmr_search.store.config import IndexConfig
    from cmr_search.store.embedding_store import EmbeddingStore
    from cmr_search.store.index import VectorIndex
    from cmr_search.store.withdrawal import finish_pending_withdrawals

    started = time.monotonic()
    store = ClipStore.open(store_root)
    registry = EncoderRegistry(store_root)
    model_id = registry.register(checkpoint, **{k: v for k, v in load_options.items()
                                               if k in ("allow_partial", "trust_pickle", "config")})
    embedder = Embedder(registry.layout.encoder(model_id), device=device, compile_batch=batch_size,
                        compile=load_options.get("compile", False))
    tables = EmbeddingStore(store, embedder.dim)
    finish_pending_withdrawals(tables)  # never embed (or index) a study a crash left half-withdrawn
    embedded = skipped = 0
    if ray is None:
        encoders = nullcontext(lambda corpus, todo: _encode_locally(corpus, embedder, todo, batch_size))
    else:
        from cmr_search.encoder.cluster import encoder_pool

        encoders = encoder_pool(ray, store_root, registry.layout.encoder(model_id), device, batch_size,
                                load_options.get("compile", False))
    with encoders as encode:
        for attempt in range(3):
            corpus = ClipCorpus(store_root)  # pixels by row id at one pinned table version
            meta = corpus.metadata([*VIEW_META, "ingested_at"]).to_pylist()
            done = tables.embedded_clip_ids(embedder.model_id)
            todo = [m for m in meta if m["clip_id"] not in done]
            skipped = skipped if attempt else len(meta) - len(todo)
            try:
                embedded += _embed_clips(tables, embedder.model_id, todo, encode(corpus, todo), commit_every,
                                         progress, before_commit)
                break
            except RuntimeError as error:
                # a withdrawal with purge rewrote the clip table and dropped the pinned version's
                # files; what was committed stays, the rest is read again at the new version
                if "Not found" not in str(error) or attempt == 2:
                    raise
                log.warning("the clip table was rewritten by a withdrawal while embedding; reading it again")
    n_studies = _pool_studies(tables, embedder, before_commit)
    for table in ("views", "studies"):  # the FAISS indexes reflect the new rows before we return
        VectorIndex.open(tables, table, embedder.model_id, index_config or IndexConfig())
    if set_default or (set_default is None and registry.default is None):
        registry.set_default(model_id)  # a text-aligned model, not the video model it embeds with
    return EmbedReport(model_id, embedded, skipped, n_studies, time.monotonic() - started, registry.default)


def _encode_locally(corpus, embedder: Embedder, todo: list[dict], batch_size: int):
    """(batch of todo rows, their float32 embeddings) in order, encoded in this process."""
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        yield chunk, embedder.encode_clips(corpus.read_clips([m["_rowid"] for m in chunk])).numpy()


def _embed_clips(tables, model_id: str, todo: list[dict], batches, commit_every: int, progress: bool,
                 before_commit) -> int:
    """Commit the views of these clips of the pinned corpus as ``batches`` (``(rows,
    vectors)``, in any order) bring their embeddings; how many were embedded."""
    clips_read = {m["clip_id"]: m["ingested_at"] for m in todo}
    bar = _progress(progress, len(todo))
    pending: list[dict] = []
    try:
        for chunk, vectors in batches:
            for m, v in zip(chunk, vectors):
                row = {k: m[k] for k in VIEW_META}
                pending.append(row | {"model_id": model_id, "vector": v.tolist()})
            if len(pending) >= commit_every:
                _commit_views(tables, pending, clips_read, before_commit)
                pending = []
            if bar:
                bar[0].update(bar[1], advance=len(chunk))
        _commit_views(tables, pending, clips_read, before_commit)
    finally:
        if bar:
            bar[0].stop()
    return len(todo)


def _study_row(uid: str, cols: list[dict], vectors: np.ndarray, embedder: Embedder) -> dict:
    """One study's row from its views' metadata and embeddings (views ordered by view, slice)."""
    idx = sorted(range(len(cols)), key=lambda i: (cols[i]["view"], cols[i]["slice_index"] or 0))
    study, attention = embedder.pool_views(torch.from_numpy(np.ascontiguousarray(vectors[idx])))
    first = cols[idx[0]]
    return {
        "study_uid": uid, "patient_key": first["patient_key"], "model_id": embedder.model_id,
        "vector": study.tolist(), "views_present": sorted({cols[i]["view"] for i in idx}), "n_views": len(idx),
        "clip_ids": [cols[i]["clip_id"] for i in idx], "attention": attention.tolist(),
        **{k: first[k] for k in ("sex", "age", "vendor", "site", "study_date")},
    }


def embed_study(clip_rows: list[dict], embedder: Embedder, batch_size: int = 16) -> tuple[list[dict], dict]:
    """A new study's clip rows (the clip store's columns, pixels in ``clip``) -> its ``views``
    rows and its ``studies`` row, as ``cmr embed`` would write them."""
    if not clip_rows or len({r["study_uid"] for r in clip_rows}) != 1:
        raise InputError("embed_study takes the clips of exactly one study")
    clips = np.stack([np.frombuffer(r["clip"], np.uint8).reshape(r["frames"], r["height"], r["width"])
                      for r in clip_rows])
    vectors = _encode_batches(clips, embedder, batch_size).numpy()
    cols = [{k: r.get(k) for k in VIEW_META} for r in clip_rows]
    views = [c | {"model_id": embedder.model_id, "vector": v.tolist()} for c, v in zip(cols, vectors)]
    return views, _study_row(cols[0]["study_uid"], cols, vectors, embedder)


def _commit_views(tables, rows: list[dict], clips_read: dict, before_commit) -> None:
    if not rows:
        return
    if before_commit is not None:
        before_commit("views")
    tables.commit_views(rows, clips_read)


def _pool_studies(tables, embedder: Embedder, before_commit=None) -> int:
    rows = tables.view_rows(embedder.model_id)
    vectors = tables.vectors(rows)
    cols = rows.drop_columns(["vector"]).to_pylist()
    by_study: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(cols):
        by_study[r["study_uid"]].append(i)
    out = [_study_row(uid, [cols[i] for i in idx], vectors[idx], embedder) for uid, idx in by_study.items()]
    if before_commit is not None:
        before_commit("studies")
    written, _ = tables.commit_studies(out, {c["clip_id"]: c["rev"] for c in cols})
    return written


def _progress(enabled: bool, total: int):
    if not enabled or total == 0:
        return None
    from cmr_search.core.progress import progress_bar

    bar = progress_bar()
    bar.start()
    return bar, bar.add_task("embedding clips", total=total)
