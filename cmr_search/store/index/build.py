"""Which index a table gets, where it runs, and building it a batch at a time.

Exact inner product (``IndexIDMap2`` over ``IndexFlatIP``) below ``exact_below`` rows,
IVF-Flat above (nlist = 4 sqrt(N) rounded to a power of two, k-means on a sample of
``train_per_list`` vectors per list, the lists found through an HNSW32 graph over the
centroids). Searches run on a GPU through faiss' GPU build when present, else as an exact
torch matmul + top-k (``TorchExactIndex``) when torch sees CUDA, else on the CPU.

A build reads its vectors from a ``VectorSource``: the IVF is trained on the sample first,
then every row is added a batch at a time, so a build over a Lance table holds the index
plus one batch, never the whole table beside the index (``sync.TableSource``).
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import faiss
import numpy as np

from cmr_search.core.exceptions import StoreError
from cmr_search.store.config import IndexConfig
from cmr_search.store.index.torch_exact import TorchExactIndex

__all__ = ["ArraySource", "BuildStats", "Built", "VectorSource", "build_from", "build_index", "gpu_device",
           "index_bytes", "ivf_lists", "omp_threads", "peak_rss_bytes", "rss_bytes", "search_form", "train_positions"]

log = logging.getLogger(__name__)


class BuildStats(NamedTuple):
    """What a build cost (bytes; ``rss_peak`` is the process's resident memory at the build's
    peak, so it includes whatever the process held before: ``rss_before``)."""

    seconds: float
    chunks: int  # batches added
    rss_before: int
    rss_peak: int
    index_bytes: int  # see index_bytes


class Built(NamedTuple):
    """A freshly built index: the index, its kind (flat | ivf | exact-torch), the rows it was
    trained on, and what building it cost."""

    index: object
    kind: str
    trained_rows: int
    stats: BuildStats | None = None


class VectorSource(Protocol):
    """Where a build reads its rows: ``rows`` of them, ``sample`` for training, ``batches``
    for adding."""

    rows: int

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at these positions of the rows sorted by ``vec_id``, in that order."""

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vectors float32 [b, dim], vec_ids [b]) a batch at a time, every row once."""


class ArraySource:
    """Rows already in memory (sorted by ``vec_id``), as one batch."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray):
        self.vectors, self.ids, self.rows = vectors, ids, len(ids)

    def sample(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at these positions."""
        return self.vectors[positions]

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All rows at once."""
        yield self.vectors, self.ids


_thread_state = threading.local()


def omp_threads(threads: int | None) -> None:
    """Limit FAISS' OpenMP threads in the calling thread. OpenMP keeps this setting per
    thread: set in one thread only, every API worker thread would still fork a team of all
    cores per search (measured: 5 ms of CPU per 1 ms query under 8 concurrent requests)."""
    if threads and getattr(_thread_state, "omp", None) != threads:
        faiss.omp_set_num_threads(threads)
        _thread_state.omp = threads


def gpu_device(config: IndexConfig) -> str | None:
    """'faiss' or 'torch' when searches should run on a GPU, else None."""
    if config.device == "cpu":
        return None
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return "faiss"
    import torch

    if torch.cuda.is_available():
        return "torch"
    if config.device == "cuda":
        raise StoreError("device 'cuda' asked for, but neither faiss nor torch sees a GPU; use device 'auto' or 'cpu'")
    return None


def rss_bytes() -> int:
    """Resident memory of this process now (its peak so far where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The most resident memory this process has held (its high-water mark)."""
    try:  # not ru_maxrss where there is a choice: Linux carries it over an exec, so a process
        # started by a large one (a benchmark's child, a worker) reports its parent's peak
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


class _Meter:
    """A build's time and peak resident memory. tracemalloc cannot see faiss' allocations, so
    memory is read from the kernel: the process's high-water mark when the build raised it
    (exact), else the most resident memory seen at the build's own steps (after training,
    after each batch is added, while that batch is still held)."""

    def __init__(self):
        self.started, self.hwm = time.perf_counter(), peak_rss_bytes()
        self.before = self.peak = rss_bytes()

    def step(self) -> None:
        self.peak = max(self.peak, rss_bytes())

    def stats(self, chunks: int, size: int) -> BuildStats:
        hwm = peak_rss_bytes()  # (the kernel's counters lag by a few pages: never below what was seen)
        peak = max(self.peak, rss_bytes(), hwm if hwm > self.hwm else 0)
        return BuildStats(time.perf_counter() - self.started, chunks, self.before, peak, size)


def train_positions(rows: int, config: IndexConfig) -> tuple[int, np.ndarray]:
    """(nlist, the positions of the training sample among the rows sorted by ``vec_id``) of an
    IVF over ``rows`` rows: ``train_per_list`` per list, drawn with the config's seed, so a
    build from memory and one from a table train on the same vectors in the same order."""
    nlist = config.nlist or 2 ** round(math.log2(4 * math.sqrt(rows)))
    rng = np.random.default_rng(config.seed)
    return nlist, rng.choice(rows, min(rows, nlist * config.train_per_list), replace=False)


def build_index(vectors: np.ndarray, ids: np.ndarray, dim: int, config: IndexConfig, gpu: str | None) -> Built:
    """A new index over vectors in memory, ordered by ``vec_id`` as the training sample's
    positions assume (``gpu``: what ``gpu_device`` said)."""
    return build_from(ArraySource(vectors, ids), dim, config, gpu)


def build_from(source: VectorSource, dim: int, config: IndexConfig, gpu: str | None) -> Built:
    """A new index over the source's rows, trained on its sample and filled a batch at a time."""
    meter, n, cfg = _Meter(), source.rows, config
    if gpu == "torch":
        index, kind = TorchExactIndex(dim, "cuda"), "exact-torch"
        index.reserve(n)
    elif n < cfg.exact_below:
        index, kind = faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat"  # IDMap2: a vector by its id
        _reserve(faiss.downcast_index(index.index), n)
    else:
        index, kind = _trained_ivf(source, dim, cfg), "ivf"
        meter.step()
    chunks = 0
    for vectors, ids in source.batches():
        index.add_with_ids(vectors, ids)
        chunks += 1
        meter.step()
    if kind == "ivf":
        index.nprobe = cfg.nprobe
    stats = meter.stats(chunks, index_bytes(index, kind))
    log.info("built %s index over %d rows in %.1f s, %d batches: index %.0f MiB, peak RSS %.0f MiB (%.0f MiB before)",
             kind, n, stats.seconds, chunks, stats.index_bytes / 2**20, stats.rss_peak / 2**20, stats.rss_before / 2**20)
    return Built(index, kind, n, stats)


def _reserve(flat, rows: int) -> None:
    # batches would grow the codes by doubling: at the peak, the old codes beside twice as
    # many (measured at 200k rows: a rise of 526 MiB against 401 MiB). A vector resized down keeps its
    # capacity, so the codes are allocated once. (An IVF's lists grow the same way, whether
    # added at once or in batches; their sizes are known only once the rows are assigned.)
    flat.codes.resize(rows * flat.code_size)
    flat.codes.resize(0)


def _trained_ivf(source: VectorSource, dim: int, cfg: IndexConfig):
    nlist, positions = train_positions(source.rows, cfg)
    coarse = {"hnsw": "_HNSW32", "flat": ""}[cfg.quantizer]
    # the factory trains k-means on a flat index, then fills the HNSW graph with the centroids
    index = faiss.index_factory(dim, f"IVF{nlist}{coarse},Flat", faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter = cfg.seed, cfg.kmeans_iters
    index.train(source.sample(positions))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def index_bytes(index, kind: str) -> int:
    """The bytes of an index's vectors, ids and centroids. The id maps (the IDMap2's reverse
    map, the IVF's hashtable direct map) and allocator slack come on top: the resident memory
    ``benchmarks/index_scale.py`` measures includes them."""
    if kind == "exact-torch":
        return index.vectors.numel() * index.vectors.element_size() + 16 * index.ntotal  # ids on host and device
    if kind == "flat":
        return index.ntotal * (faiss.downcast_index(index.index).code_size + 8)
    ivf = faiss.extract_index_ivf(index)
    return index.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4


def ivf_lists(index, kind: str) -> int:
    """IVF lists of an index (0 for exact indexes)."""
    return faiss.extract_index_ivf(index).nlist if kind == "ivf" else 0


def search_form(index, kind: str, config: IndexConfig, gpu: str | None, resources=None) -> tuple[object, object]:
    """What searches use: the CPU index with the config's search settings, or its clone on
    the GPU; returns (search index, the GPU resources to reuse next time)."""
    if kind == "ivf":  # search settings are not persisted with the index: the config decides
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe, ivf.parallel_mode = config.nprobe, config.parallel_mode
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = config.quantizer_ef
        if ivf.direct_map.type == faiss.DirectMap.NoMap:  # id -> list entry, for `vector` (kept through add/remove)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    if gpu == "faiss" and index is not None:
        resources = resources or faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    return index, resources
