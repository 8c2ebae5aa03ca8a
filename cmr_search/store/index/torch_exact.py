"""Exact inner-product search as a torch matmul + top-k: the GPU path where faiss has no
GPU build (faiss-cpu wheels) but torch sees a GPU.

At archive sizes (a million 512-d rows is 2 GB of float32) the whole table fits on one
card, and a brute-force product on the GPU is both exact and faster than an IVF on the CPU
(docs/BENCHMARKS.md). The ids live on the device too, so a filter is a device-side
``isin`` rather than a host-side pass over every row per query.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TorchExactIndex"]


class TorchExactIndex:
    """The subset of the faiss index API that VectorIndex uses, on a torch device."""

    def __init__(self, dim: int, device: str):
        self.device = torch.device(device)
        self.vectors = torch.empty(0, dim, device=self.device)
        self.ids = np.empty(0, np.int64)  # host copy: hits are named on the host
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._room: torch.Tensor | None = None  # see reserve; ``vectors`` is its head

    @property
    def ntotal(self) -> int:
        """Rows held."""
        return len(self.ids)

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows in all: a build adding them a batch at a time then copies
        each row once, where growing by ``cat`` would copy the whole matrix per batch."""
        self._room = torch.empty(rows, self.vectors.shape[1], device=self.device)
        self._room[: self.ntotal] = self.vectors
        self.vectors = self._room[: self.ntotal]

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Append rows (float32 [n, dim]) under their 64-bit ids."""
        ids = np.asarray(ids, np.int64)
        new = torch.from_numpy(np.asarray(vectors, np.float32)).to(self.device)
        end = self.ntotal + len(ids)
        if self._room is not None and end <= len(self._room):
            self._room[self.ntotal : end] = new
            self.vectors = self._room[:end]
        else:
            self.vectors, self._room = torch.cat([self.vectors, new]), None
        self.ids = np.concatenate([self.ids, ids])
        self._ids = torch.cat([self._ids, torch.from_numpy(ids).to(self.device)])

    def remove_ids(self, ids: np.ndarray) -> None:
        """Drop the rows with these ids (unknown ids are ignored)."""
        gone = torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
        keep = ~torch.isin(self._ids, gone)
        self.vectors, self._ids, self._room = self.vectors[keep], self._ids[keep], None
        self.ids = self.ids[keep.cpu().numpy()]

    @torch.inference_mode()
    def vector(self, vec_id: int) -> np.ndarray | None:
        """One stored vector by id (None if absent)."""
        where = np.flatnonzero(self.ids == vec_id)
        return self.vectors[int(where[0])].float().cpu().numpy() if len(where) else None

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], ids [q, k]) of the k best rows per query, only ``allowed`` ids if
        given; slots beyond the rows that qualify hold -inf and id -1, as faiss does."""
        scores = torch.from_numpy(np.asarray(queries, np.float32)).to(self.device) @ self.vectors.T
        if allowed is not None:
            mask = torch.isin(self._ids, torch.from_numpy(np.asarray(allowed, np.int64)).to(self.device))
            scores = scores.masked_fill(~mask, float("-inf"))
        top = scores.topk(min(k, self.ntotal), dim=1)
        d, i = top.values.cpu().numpy(), top.indices.cpu().numpy()
        return d, np.where(np.isfinite(d), self.ids[i], -1)
