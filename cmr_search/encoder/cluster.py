"""``cmr embed --ray``: the clips embedded by a pool of Ray actors, one per GPU of the cluster
(or per CPU where it has none), each holding the encoder; the driver commits what they send.

Only clip row ids go out and only vectors come back: each actor reads its batch's pixels
itself from the clip table at the driver's pinned version (a store on object storage from the
bucket, with the model downloaded from it where the node lacks the driver's state folder; a
local store on a filesystem every node mounts). The driver keeps the commit discipline of the single-machine path
(``embed._embed_clips``: ``commit_views`` under the write lock, upsert by key), so a batch
that Ray runs twice, because its actor was killed and restarted, is written once, and a
driver killed mid-run leaves the store at its last commit for a re-run to complete."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cmr_search.core.cluster import ray_cluster
from cmr_search.core.exceptions import InputError, StoreError
from cmr_search.core.layout import StoreLayout

__all__ = ["ClipEncoder", "encoder_pool"]

log = logging.getLogger(__name__)

# an actor killed (a node lost, the OOM killer) is started again and its batches sent again;
# a fault that recurs this often is not transient, and is raised
RESTARTS = 3
# batches queued at each actor: the next one is there when the last is done, without a
# round trip through the driver
IN_FLIGHT = 2

Batches = Iterator[tuple[list[dict], np.ndarray]]


class ClipEncoder:
    """One actor's encoder: clip row ids of a pinned clip-table version -> view embeddings."""

    def __init__(self, store: str, model_folder: str, device: str, batch_size: int, compile: bool):
        from cmr_search.encoder.embed import Embedder

        self.store_root, folder = _on_this_node(store, Path(model_folder))
        self.embedder = Embedder(folder, device=device, compile_batch=batch_size, compile=compile)
        self._table = self._version = None

    def encode(self, version: int, row_ids: list[int]) -> np.ndarray:
        """float32 [N, dim] embeddings of the clips at these row ids, in their order."""
        return self.embedder.encode_clips(self._read(version, row_ids)).numpy()

    def _read(self, version: int, row_ids: list[int]) -> np.ndarray:
        # ClipCorpus.read_clips at a version given, not the newest: a corpus pins the table
        # as it opens and reads every clip's metadata, which an actor has no use for
        if self._version != version:
            from cmr_search.store.clip_store import ClipStore

            store = ClipStore.open(self.store_root)
            self._table = store.clips
            self._table.checkout(version)
            self._version, self._shape = version, (store.clip_config.frames, store.clip_config.size,
                                                   store.clip_config.size)
        got = self._table.take_row_ids(sorted(set(row_ids))).select(["clip"]).with_row_id().to_arrow()
        by_id = dict(zip(got["_rowid"].to_pylist(), got["clip"].to_pylist()))
        return np.stack([np.frombuffer(by_id[r], np.uint8).reshape(self._shape) for r in row_ids])


def _on_this_node(store: str, model_folder: Path) -> tuple[Path, Path]:
    """The store's root and the model's folder as this node reaches them. A store on object
    storage (``store`` its URI) needs no file system shared with the driver: a node without
    the driver's state folder uses its own (``CMR_STATE_DIR`` or the default for the URI),
    which joins the store when the clips are opened, and downloads the model from the
    bucket (``store.models``). A local store must be at the same path on every node."""
    from cmr_search.core.location import is_object_uri, store_root
    from cmr_search.core.settings import Settings

    if not is_object_uri(store):
        return Path(store), model_folder
    from cmr_search.store.models import pull_model
    from cmr_search.store.object_store import join

    layout = StoreLayout(join(store_root(store, Settings().state_dir)))
    pull_model(layout, model_folder.name)  # a model_id names its folder; one not in the bucket fails in Embedder
    return layout.root, layout.encoder(model_folder.name)


@contextmanager
def encoder_pool(address: str, store_root: Path, model_folder: Path, device: str | None, batch_size: int,
                 compile: bool = False) -> Iterator[Callable[[object, list[dict]], Batches]]:
    """A pool of ``ClipEncoder`` actors on the Ray cluster ``address`` ("local" starts one on
    this machine, "auto" joins the running one, else "host:port" or "ray://host:port"), as
    ``encode(corpus, todo)``: the todo clips' metadata rows of the pinned ``corpus``, in
    batches of ``batch_size``, -> ``(batch, vectors)`` as the actors finish them. ``device``
    None: GPU actors where the cluster has GPUs, else CPU ones; "cpu" or "cuda" forces it."""
    with ray_cluster(None if address == "local" else address) as ray:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        on_gpu = gpus > 0 if device is None else device.startswith("cuda")
        if on_gpu and not gpus:
            raise InputError(f"--device {device} asks for GPU actors, but the Ray cluster at {address} has no GPU; "
                             "give --device cpu, or join a cluster with GPUs")
        if not (gpus if on_gpu else cpus):
            raise InputError(f"the Ray cluster at {address} has no CPU to run an encoder on; add a node to it")
        actor = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=1, max_restarts=RESTARTS,
                           max_task_retries=RESTARTS)(ClipEncoder)
        actors = []
        # a store on object storage by its URI: a node reaches it without the driver's files
        where = StoreLayout(Path(store_root)).uri or str(Path(store_root).resolve())
        try:
            def encode(corpus, todo: list[dict]) -> Batches:
                batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
                # no more actors than batches: each one loads the model, seconds on a GPU
                while len(actors) < min(gpus if on_gpu else cpus, len(batches)):
                    actors.append(actor.remote(where, str(Path(model_folder).resolve()),
                                               "cuda" if on_gpu else "cpu", batch_size, compile))
                log.info("embedding %d clips on %d %s actors", len(todo), len(actors), "GPU" if on_gpu else "CPU")
                try:
                    yield from _dispatch(ray, actors, corpus.version, batches)
                except ray.exceptions.RayActorError as err:
                    # restarts spent, or its constructor failed (which Ray does not retry):
                    # most often a node without the store at this path, or without cmr-search
                    raise StoreError(
                        f"an encoder actor on the Ray cluster died ({type(err).__name__}: {str(err)[-300:]}); "
                        f"every node must have cmr-search installed and reach the store at {where} (a folder: "
                        "the same path on every node; object storage: the same AWS_* credentials); "
                        "what was committed stays, and a re-run embeds the rest") from None

            yield encode
        finally:
            for a in actors:  # a joined cluster outlives this run; its actors need not
                ray.kill(a)


def _dispatch(ray, actors: list, version: int, batches: list[list[dict]]) -> Batches:
    """Each batch to an actor, ``IN_FLIGHT`` at a time per actor; results in completion order."""
    queue = iter(batches)
    pending: dict = {}

    def submit(actor) -> None:
        batch = next(queue, None)
        if batch is not None:
            pending[actor.encode.remote(version, [m["_rowid"] for m in batch])] = (actor, batch)

    for a in actors:
        for _ in range(IN_FLIGHT):
            submit(a)
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        a, batch = pending.pop(ref)
        vectors = ray.get(ref)
        submit(a)
        yield batch, vectors
