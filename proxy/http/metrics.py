"""Prometheus metrics for /metrics.

Counters live in each worker; under gunicorn they are summed across workers through
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by gunicorn_conf.py), so
a scrape that lands on any worker sees the whole proxy. The lifecycle's own figures (phase,
in-flight, cold starts) come from the shared snapshot at scrape time.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import falcon
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from proxy.lifecycle import gputime
from proxy.lifecycle.demand import PHASES, Lifecycle

REQUESTS = Counter(
    "ollama_exoscale_requests_total",
    "Requests by route and outcome (forwarded, local, unavailable, unauthorized, forbidden, "
    "upstream_error, client_closed, rejected, error).",
    ["route", "outcome"],
)
HANGUPS = Counter(
    "ollama_exoscale_client_hangups_total",
    "Forwarded requests whose client went away before the answer ended (logged as 499): "
    "hung up, or dropped for reading nothing for PROXY_READ_TIMEOUT; the upstream was closed.",
    ["route"],
)
HELD = Gauge(
    "ollama_exoscale_held_requests",
    "Requests held while provisioning (Prefer: wait).",
    multiprocess_mode="livesum",
)
COLD_START_BUCKETS = (10, 30, 60, 120, 180, 300, 420, 600, 900, 1200, 1800)

# The label values a route may take: Ollama's and OpenAI's routes, never a client's raw path.
KNOWN_ROUTES = frozenset(
    "/ /status /metrics /ui /api/chat /api/generate /api/embed /api/embeddings /api/show "
    "/api/pull /api/push /api/create /api/copy /api/delete /api/tags /api/ps /api/version "
    "/v1/chat/completions /v1/completions /v1/embeddings /v1/models".split()
)


def route_label(path: str) -> str:
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/api/blobs/"):
        return "/api/blobs"
    if path.startswith("/admin/"):
        return path if path in ("/admin/up", "/admin/down") else "/admin/other"
    if path.startswith("/v1/"):
        return "/v1/other"
    return "/api/other" if path.startswith("/api/") else "other"


def outcome(status: int, forwarded: bool) -> str:
    if forwarded and status not in (499, 502, 504):
        return "forwarded"
    return {
        401: "unauthorized", 403: "forbidden", 502: "upstream_error", 504: "upstream_error",
        503: "unavailable", 499: "client_closed",
    }.get(status, "error" if status >= 500 else ("rejected" if status >= 400 else "local"))


class Counting:
    """Falcon middleware: one count per request, by route and outcome."""

    def __init__(self):
        self._counters: dict[tuple[str, str], Any] = {}  # labels() validates and locks each call

    async def process_response(self, req, resp, resource, req_succeeded) -> None:
        status = falcon.http_status_to_code(resp.status)
        forwarded = getattr(req.context, "forwarded", False)
        key = (route_label(req.path), outcome(status, forwarded))
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(*key)
        counter.inc()


class LifecycleCollector:
    """The shared lifecycle, read from this worker's snapshot at scrape time."""

    def __init__(self, lifecycle: Lifecycle, idle_timeout: float):
        self.lifecycle = lifecycle
        self.idle_timeout = idle_timeout

    def collect(self) -> Iterator:
        snapshot = self.lifecycle.snapshot()
        phase = GaugeMetricFamily(
            "ollama_exoscale_phase", "1 for the lifecycle's current phase.", labels=["phase"]
        )
        for name in PHASES:
            phase.add_metric([name], 1.0 if snapshot.phase == name else 0.0)
        yield phase
        yield GaugeMetricFamily(
            "ollama_exoscale_in_flight", "Requests and streams forwarded right now, all workers.",
            value=snapshot.demand.inflight,
        )
        yield from _fleet(snapshot)
        yield GaugeMetricFamily(
            "ollama_exoscale_phase_seconds", "Seconds in the current phase.",
            value=max(0.0, time.time() - since) if (since := snapshot.state.phase_since) else 0.0,
        )
        yield GaugeMetricFamily(
            "ollama_exoscale_provisioning_failures",
            "Failed provisioning attempts in a row (0 after a success).",
            value=snapshot.state.failures,
        )
        yield _cold_starts(snapshot.state.cold_starts)
        now = time.time()
        yield CounterMetricFamily(
            "ollama_exoscale_gpu_seconds",
            "Seconds GPU servers have existed, in all (gone ones and the current one).",
            value=gputime.total_seconds(snapshot.state.gpu_record, now),
        )
        yield GaugeMetricFamily(
            "ollama_exoscale_gpu_seconds_today",
            "GPU seconds used today (PROXY_TIMEZONE), the figure the daily budget is held to.",
            value=gputime.today_seconds(snapshot.state.gpu_record, now, self.lifecycle.config.tz),
        )


def _fleet(snapshot) -> Iterator:
    """The fleet: servers by phase, and each server's requests in flight."""
    members = snapshot.members()
    servers = GaugeMetricFamily(
        "ollama_exoscale_servers", "GPU servers by phase (the primary and the fleet's others).",
        labels=["phase"])
    for name in PHASES:
        servers.add_metric([name], float(sum(1 for m in members if m.phase == name)))
    yield servers
    if len(members) > 1:
        by_server = GaugeMetricFamily(
            "ollama_exoscale_server_in_flight", "Requests and streams on each GPU server.",
            labels=["server"])
        for member in members:
            by_server.add_metric([member.name], float(member.inflight))
        yield by_server


def _cold_starts(durations: tuple[float, ...]) -> HistogramMetricFamily:
    """The recent cold starts kept in the store (the last 20), as a histogram."""
    buckets = []
    for bound in COLD_START_BUCKETS:
        buckets.append((str(bound), sum(1 for d in durations if d <= bound)))
    buckets.append(("+Inf", len(durations)))
    family = HistogramMetricFamily(
        "ollama_exoscale_cold_start_seconds",
        "Seconds from the first demand to ready, for the recent cold starts.",
    )
    family.add_metric([], buckets, sum_value=sum(durations))
    return family


class MetricsResource:
    def __init__(self, lifecycle: Lifecycle, idle_timeout: float):
        self.collector = LifecycleCollector(lifecycle, idle_timeout)
        self._lock = threading.Lock()  # the collector joins a registry for one scrape at a time

    async def on_get(self, req, resp) -> None:
        # The workers' files are read in a thread: nothing blocking on the event loop.
        resp.data = await asyncio.to_thread(self._scrape)
        resp.content_type = CONTENT_TYPE_LATEST

    def _scrape(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        with self._lock:
            registry.register(self.collector)
            try:
                return generate_latest(registry)
            finally:
                registry.unregister(self.collector)
