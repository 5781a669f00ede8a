"""Prometheus metrics of the HTTP service (`prometheus-client`), served at GET /metrics.

    llmkd_http_requests_total{route, status}            requests answered (503 = refused by the bounded queue)
    llmkd_http_request_duration_seconds{route}          latency histogram, first byte in to last byte out
    llmkd_queue_depth                                   model calls waiting or running (summed over workers)
    llmkd_bundle_info{version, pid}                     1 for the bundle each server process serves now (0 for
                                                        one it served before, under --workers)
    llmkd_catalog_items{pid}                            items in that bundle
    llmkd_reloads_total{outcome}                        reloaded / unchanged / refused

Each app has its own registry (no module-level state), so several apps live in one process (tests).
With `llmkd serve --workers N` every worker writes its values to files in `PROMETHEUS_MULTIPROC_DIR`
(prometheus-client's multiprocess mode, set up by the supervisor) and any worker's /metrics reads them
all: counters and histograms are sums over the workers, gauges carry a `pid` label.

`Instrumented` is a pure ASGI middleware: a clock read, a status seen in `http.response.start`, and one
counter and one histogram update (label children cached) per request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
ROUTES = ("/recommend", "/recommend/batch", "/health", "/ready", "/metadata", "/metrics", "/admin/reload", "/docs",
          "/openapi.json")


def route_of(path: str) -> str:
    """The route label of a request path: a known route, the similar-items template, or 'other' (so a
    scan of random paths cannot grow the label set)."""
    if path in ROUTES:
        return path
    if path.startswith("/items/") and path.endswith("/similar"):
        return "/items/{item_id}/similar"
    return "other"


class ServiceMetrics:
    """The service's metrics in a registry of their own; `exposition()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        reg = self.registry
        self.requests = Counter("llmkd_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=reg)
        self.latency = Histogram("llmkd_http_request_duration_seconds", "HTTP request latency (s), by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=reg)
        self.queue = Gauge("llmkd_queue_depth", "model calls waiting or running", registry=reg,
                           multiprocess_mode="livesum")
        self.pid = [] if self.multiprocess else [str(os.getpid())]  # multiprocess mode adds `pid` itself
        pid = ["pid"] if not self.multiprocess else []
        self.bundle = Gauge("llmkd_bundle_info", "1 for the version of the bundle served", ["version", *pid],
                            registry=reg, multiprocess_mode="liveall")
        self.items = Gauge("llmkd_catalog_items", "items in the served bundle's catalog", pid, registry=reg,
                           multiprocess_mode="liveall")
        self.reloads = Counter("llmkd_reloads", "bundle reloads, by outcome", ["outcome"], registry=reg)
        self.children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.version: str | None = None
        self.inflight = self.answered = self.unanswered = 0
        self.counts: dict[tuple[str, int], int] = {}  # answered requests by (route, status), for the exit line
        self.depth: Callable[[], int] = lambda: 0
        """The queue depth now (set by the app); read at each scrape, and after each request under --workers
        (a worker that is not scraped must still keep its share of the summed gauge current)."""
        """Plain counts of this process (what a drain reports at exit): requests in progress, answered (the
        whole response sent), ended without an answer (a client gone, a task cancelled past the drain timeout)."""

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        child = self.children.get((route, status))
        if child is None:
            child = self.children[(route, status)] = (self.requests.labels(route, str(status)),
                                                      self.latency.labels(route))
        child[0].inc()
        child[1].observe(seconds)
        self.counts[(route, status)] = self.counts.get((route, status), 0) + 1

    def serving(self, version: str | None, items: int) -> None:
        """Record the bundle now served (at start and after each swap)."""
        if self.version is not None:  # 0 first: in multiprocess mode the file keeps the last value written
            self.bundle.labels(self.version, *self.pid).set(0)
            self.bundle.remove(self.version, *self.pid)
        self.version = version or "unknown"
        self.bundle.labels(self.version, *self.pid).set(1)
        if self.pid:
            self.items.labels(*self.pid).set(items)
        else:
            self.items.set(items)

    def exposition(self) -> bytes:
        """The text format of every metric (of every worker, in multiprocess mode)."""
        self.queue.set(self.depth())
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return generate_latest(reg)


class Instrumented:
    """Pure ASGI middleware: every HTTP request's route, status and latency into `metrics`, and its plain
    counts (`ServiceMetrics.inflight`, `answered`, `unanswered`)."""

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t, status, done = time.perf_counter(), 500, False

        async def sending(message) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True

        m = self.metrics
        m.inflight += 1
        try:
            await self.app(scope, receive, sending)
        finally:
            m.inflight -= 1
            if done:
                m.answered += 1
                m.observe(route_of(scope["path"]), status, time.perf_counter() - t)
                if m.multiprocess:
                    m.queue.set(m.depth())
            else:
                m.unanswered += 1
