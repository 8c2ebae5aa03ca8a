"""Prometheus metrics of one API process (its own registry, so several apps in one
process, as in the tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ApiMetrics"]


class ApiMetrics:
    """Request counts and latencies by route, index sizes, uploads and withdrawals."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("cmr_requests_total", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("cmr_request_seconds", "Request latency by route template", ["method", "route"],
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
                                 registry=self.registry)
        self.index_rows = Gauge("cmr_index_rows", "Rows in the FAISS index", ["table"], registry=self.registry)
        self.uploads = Counter("cmr_uploads_total", "Uploaded studies by outcome", ["outcome"], registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self, index_rows: dict[str, int]) -> bytes:
        """The Prometheus text exposition."""
        for table, n in index_rows.items():
            self.index_rows.labels(table).set(n)
        return generate_latest(self.registry)
