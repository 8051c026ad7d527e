"""Optional OpenTelemetry tracing of worker tasks (``pip install dspex-tasks[otel]``).

With ``DSPEX_OTEL=1`` (``Settings.otel``) each process that runs tasks calls ``CeleryInstrumentor().instrument()``: the
worker's main process for the threads and solo pools (``worker_init``), each child for prefork
(``worker_process_init``, after the fork, as OpenTelemetry requires). Producers that instrument their
own Celery client (the same call) propagate the trace context through the message headers.

When no tracer provider is configured yet and the SDK is installed, one is set up from the standard
``OTEL_*`` variables (``OTEL_SERVICE_NAME``, default ``dspex-worker``; ``OTEL_EXPORTER_OTLP_ENDPOINT``)
with an OTLP exporter when one is installed. Requested but not installed: a warning with the install
hint, and the worker runs untraced.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..settings import Settings

__all__ = ["INSTALL_HINT", "install", "setup_tracing"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install dspex-tasks[otel]"
_done_pid: int | None = None
_warned = False


def setup_tracing(**_: Any) -> bool:
    """Instrument Celery in this process (when installed); True once instrumented.

    Safe to call repeatedly and from signal handlers (extra keyword arguments are ignored). Connected
    by :func:`install` only when ``Settings.otel`` asks for tracing.
    """
    global _done_pid, _warned
    if _done_pid == os.getpid():
        return True
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
    except ImportError:
        if not _warned:
            _warned = True
            log.warning("DSPEX_OTEL is set but opentelemetry-instrumentation-celery is not installed; "
                        "tracing is off (%s)", INSTALL_HINT)
        return False
    try:
        _configure_provider()
        instrumentor = CeleryInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
    except Exception as exc:  # tracing must never stop a worker
        log.warning("OpenTelemetry instrumentation failed: %s", exc)
        return False
    _done_pid = os.getpid()
    log.info("OpenTelemetry: Celery tasks traced in pid %d", _done_pid)
    return True


def _configure_provider() -> None:
    """Set an SDK tracer provider (with an OTLP exporter if installed) unless one is configured already."""
    from opentelemetry import trace

    if not type(trace.get_tracer_provider()).__name__.startswith(("Proxy", "NoOp")):
        return  # configured by the application or by ``opentelemetry-instrument``
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                       "dspex-worker")}))
    exporter_cls = _otlp_exporter()
    if exporter_cls is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter_cls()))
    trace.set_tracer_provider(provider)


def _otlp_exporter() -> Any:
    """The OTLP span exporter class (HTTP, else gRPC), or None when neither is installed."""
    import importlib

    for module in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                   "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"):
        try:
            return importlib.import_module(module).OTLPSpanExporter
        except ImportError:
            continue
    return None


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    pool = str(getattr(sender, "pool_cls", None) or getattr(getattr(app, "conf", None), "worker_pool", ""))
    if "prefork" not in pool.lower():  # prefork: each child instruments itself after the fork
        setup_tracing()


def install(settings: Settings) -> bool:
    """Connect :func:`setup_tracing` to ``worker_init`` and ``worker_process_init`` (once per process) when
    ``DSPEX_OTEL`` asks for tracing; returns whether it did."""
    from celery import signals

    if not settings.otel:
        return False
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="dspex.tracing.worker_init")
    signals.worker_process_init.connect(setup_tracing, weak=False, dispatch_uid="dspex.tracing.process_init")
    return True
