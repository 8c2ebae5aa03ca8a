"""Prometheus metrics of the API.

One process: each app keeps its own registry, so several apps in one process (as in the
tests) do not share counters. Several uvicorn workers (``cmr serve --workers N``): ``cmr
serve`` points prometheus_client's ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before
the workers start, every worker writes its values there, and a scrape of any worker
answers the sum over all of them (prometheus_client's multiprocess mode), not the
counts of whichever worker the scrape reached.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = ["ApiMetrics"]


class ApiMetrics:
    """Request counts and latencies by route, index sizes, uploads and withdrawals."""

    def __init__(self):
        # prometheus_client's own switch, read when it is imported: values live in files
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.registry = CollectorRegistry()
        self.requests = Counter("cmr_requests_total", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("cmr_request_seconds", "Request latency by route template", ["method", "route"],
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
                                 registry=self.registry)
        # every worker sees the same tables: the value the scraped worker just set is the answer
        self.index_rows = Gauge("cmr_index_rows", "Rows in the FAISS index", ["table"], registry=self.registry,
                                multiprocess_mode="livemostrecent")
        self.uploads = Counter("cmr_uploads_total", "Uploaded studies by outcome", ["outcome"], registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self, index_rows: dict[str, int]) -> bytes:
        """The Prometheus text exposition (of every worker, in multiprocess mode)."""
        for table, n in index_rows.items():
            self.index_rows.labels(table).set(n)
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return generate_latest(merged)

    def close(self) -> None:
        """At a worker's exit: drop its live gauges from the shared folder."""
        if self.multiprocess_dir:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)
