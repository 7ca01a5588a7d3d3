"""Prometheus metrics of one app: requests and latencies by route and by personalization method, adapter cache
hits and misses, and the sizes of the batches answers ran in. Each app has its own registry."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from personalize.results import GenerationResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "personalize_http_requests",
            "HTTP requests by route, verb and status.",
            ["route", "verb", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "personalize_http_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "personalize_generations", "Answers by the method that ran (rag, peft, ...).", ["method"], registry=r
        )
        self.generation_latency = Histogram(
            "personalize_generation_seconds",
            "Seconds per answer by the method that ran.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_cache = Counter(
            "personalize_adapter_cache",
            "Adapter cache lookups of answers that used an adapter.",
            ["result"],
            registry=r,
        )
        self.batch_size = Histogram(
            "personalize_batch_size", "Rows of the batch each answer ran in.", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )

    def observe_result(self, result: GenerationResult) -> None:
        self.generations.labels(result.method).inc()
        self.generation_latency.labels(result.method).observe(result.timings.total_s)
        facts = result.timings.extra
        if "adapter_cache_hit" in facts:
            self.adapter_cache.labels("hit" if facts["adapter_cache_hit"] else "miss").inc()
        self.batch_size.observe(facts.get("batch_size", 1))

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI, metrics: Metrics) -> None:
    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - t0)
