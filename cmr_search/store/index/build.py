"""Which index a table gets and where it runs.

Exact inner product (``IndexIDMap2`` over ``IndexFlatIP``) below ``exact_below`` rows,
IVF-Flat above (nlist = 4 sqrt(N) rounded to a power of two, k-means on a sample of
``train_per_list`` vectors per list, the lists found through an HNSW32 graph over the
centroids). Searches run on a GPU through faiss' GPU build when present, else as an exact
torch matmul + top-k (``TorchExactIndex``) when torch sees CUDA, else on the CPU.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import faiss
import numpy as np

from cmr_search.core.exceptions import StoreError
from cmr_search.store.config import IndexConfig
from cmr_search.store.index.torch_exact import TorchExactIndex

__all__ = ["Built", "build_index", "gpu_device", "ivf_lists", "omp_threads", "search_form"]


class Built(NamedTuple):
    """A freshly built index: the index, its kind (flat | ivf | exact-torch) and the rows it was trained on."""

    index: object
    kind: str
    trained_rows: int


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


def build_index(vectors: np.ndarray, ids: np.ndarray, dim: int, config: IndexConfig, gpu: str | None) -> Built:
    """A new index over these vectors (``gpu``: what ``gpu_device`` said)."""
    n, cfg = len(ids), config
    if gpu == "torch":
        index = TorchExactIndex(dim, "cuda")
        index.add_with_ids(vectors, ids)
        return Built(index, "exact-torch", n)
    if n < cfg.exact_below:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))  # IDMap2: a vector by its id
        index.add_with_ids(vectors, ids)
        return Built(index, "flat", n)
    nlist = cfg.nlist or 2 ** round(math.log2(4 * math.sqrt(n)))
    coarse = {"hnsw": "_HNSW32", "flat": ""}[cfg.quantizer]
    # the factory trains k-means on a flat index, then fills the HNSW graph with the centroids
    index = faiss.index_factory(dim, f"IVF{nlist}{coarse},Flat", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(cfg.seed)
    sample = vectors[rng.choice(n, min(n, nlist * cfg.train_per_list), replace=False)]
    index.cp.seed, index.cp.niter = cfg.seed, cfg.kmeans_iters
    index.train(sample)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.add_with_ids(vectors, ids)
    index.nprobe = cfg.nprobe
    return Built(index, "ivf", n)


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
