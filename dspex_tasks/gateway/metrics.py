"""The gateway's own Prometheus metrics, served at ``GET /metrics`` (any key with the read right).

Requests by route template (``/v1/jobs/{job_id}``, never the raw path, so label values stay bounded), method
and status; their duration; requests in progress; and the standard ``process_*``/``python_gc_*`` series. One
registry per process (a gateway runs one uvicorn process; scale with more replicas, each scraped).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..observability.prometheus import add_runtime_collectors

__all__ = ["REGISTRY", "MetricsMiddleware", "exposition"]

REGISTRY = add_runtime_collectors(CollectorRegistry(auto_describe=True))
REQUESTS = Counter("dspex_gateway_requests", "HTTP requests by route template, method and status.",
                   ["route", "method", "status"], registry=REGISTRY)
DURATION = Histogram("dspex_gateway_request_duration_seconds", "HTTP request duration by route template (to the "
                     "end of the response body; an SSE stream counts until it closes).", ["route", "method"],
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0),
                     registry=REGISTRY)
IN_PROGRESS = Gauge("dspex_gateway_requests_in_progress", "HTTP requests being served now.", registry=REGISTRY)
UNMATCHED = "(unmatched)"


def exposition() -> bytes:
    return generate_latest(REGISTRY)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class MetricsMiddleware:
    """Outermost ASGI layer: counts every HTTP request, including those the key check refuses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        IN_PROGRESS.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            IN_PROGRESS.dec()
            route, method = _route(scope), str(scope.get("method", ""))
            REQUESTS.labels(route, method, str(status)).inc()
            DURATION.labels(route, method).observe(time.perf_counter() - t0)

