"""A replica's Prometheus metrics, in one registry per app (tests run several apps per process).

QPS is ``rate(odl_serving_requests_total[1m])``; the heartbeat carries the same figures for
``odl status`` (``Window``).
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (.0005, .001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .1, .2, .5, 1, 2)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        kw = {"registry": registry}
        self.requests = Counter("odl_serving_requests_total", "requests answered", ["endpoint", "code"], **kw)
        self.latency = Histogram("odl_serving_request_latency_seconds", "request latency in the replica",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, **kw)
        self.batch_rows = Histogram("odl_serving_batch_rows", "rows per model call", buckets=ROW_BUCKETS, **kw)
        self.batch_requests = Histogram("odl_serving_batch_requests", "requests per model call",
                                        buckets=ROW_BUCKETS, **kw)
        self.lookups = Counter("odl_serving_embedding_lookups_total",
                               "embedding rows looked up, by where the answer came from "
                               "(cache, redis, unavailable)", ["table", "source"], **kw)
        self.defaults = Counter("odl_serving_embedding_defaults_total",
                                "lookups answered with the zero default (unknown id, or Redis away)",
                                ["table"], **kw)
        self.degraded = Gauge("odl_serving_degraded", "1 while Redis is unreachable", **kw)
        self.degraded_responses = Counter("odl_serving_degraded_responses_total",
                                          "responses answered from cache and defaults only", **kw)
        self.model_version = Gauge("odl_serving_model_version", "version served", **kw)
        self.model_age = Gauge("odl_serving_model_age_seconds", "age of the served version's export", **kw)
        self.data_age = Gauge("odl_serving_data_age_seconds", "now - event time of the newest "
                              "sample behind the embeddings served (freshness)", **kw)
        self.dense_refresh = Gauge("odl_serving_dense_refresh_seq", "dense refresh applied last", **kw)
        self.model_loads = Counter("odl_serving_model_loads_total", "version loads", ["result"], **kw)
        self.cache_rows = Gauge("odl_serving_embedding_cache_rows", "rows in the local cache", ["table"], **kw)
        self.window = Window()

    def lookup(self, table: str, found) -> None:
        for source, n in (("cache", found.hits), ("redis", found.fetched), ("unavailable", found.unavailable)):
            if n:
                self.lookups.labels(table, source).inc(n)
        if found.defaults:
            self.defaults.labels(table).inc(found.defaults)

    def batch(self, requests: int, rows: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.window.batch(requests, rows)

    def answered(self, endpoint: str, code: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if seconds is not None:
            self.latency.labels(endpoint).observe(seconds)
            self.window.request(seconds)


class Window:
    """Recent latencies and batch sizes for the heartbeat (the histograms are for Prometheus)."""

    def __init__(self, keep: int = 5000):
        self._lat: deque[float] = deque(maxlen=keep)
        self._rows: deque[int] = deque(maxlen=keep)
        self._count = 0
        self._lock = threading.Lock()
        self._since, self._count_since = time.monotonic(), 0

    def request(self, seconds: float) -> None:
        with self._lock:
            self._lat.append(seconds * 1000)
            self._count += 1

    def batch(self, requests: int, rows: int) -> None:
        self._rows.append(rows)

    def summary(self) -> dict[str, float]:
        with self._lock:
            lat = np.asarray(self._lat) if self._lat else np.zeros(1)
            now = time.monotonic()
            qps = (self._count - self._count_since) / max(now - self._since, 1e-3)
            self._since, self._count_since = now, self._count
            rows = np.asarray(self._rows) if self._rows else np.zeros(1)
        return {"requests": self._count, "qps": round(qps, 1),
                "p50_ms": round(float(np.percentile(lat, 50)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "mean_batch_rows": round(float(rows.mean()), 1)}
