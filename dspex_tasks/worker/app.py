"""The deployable worker app: settings, signature modules, every dspex task, and the pre-warm hooks.

``workers/app.py`` (``celery -A workers.app worker``) and ``dspex worker`` both build it here, so the two
routes run the same app.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from ..app import DspexCelery
from ..connections import redis_client
from ..dsl.signature import SignatureRegistry
from ..errors import ConfigurationError
from ..observability import prometheus, redact, tracing
from ..optimize.schedules import register_scheduled_task
from ..optimize.stages import register_optimize_tasks
from ..settings import Settings, load_settings
from .intake import install_decompression
from .runtime import check_eviction_policy, import_signature_modules
from .startup import (
    EXIT_UNAVAILABLE,
    RedisUnreachable,
    fail_to_start,
    preflight,
    redis_line,
    route_dspy_logging,
    unmask_logged_urls,
)
from .tasks import register_map_task, register_signature

__all__ = ["create_worker_app"]

log = logging.getLogger(__name__)


def create_worker_app(settings: Settings | None = None, *, signatures: SignatureRegistry | None = None,
                      import_modules: bool = True) -> DspexCelery:
    """The deployable app: settings, signature modules, tasks, and pre-warm hooks."""
    settings = settings or load_settings()
    app = DspexCelery(settings, signatures=signatures)
    if import_modules:
        from ..settings import DEFAULT_SIGNATURE_MODULES, OPTIONAL_DEFAULT_MODULES

        default = settings.signature_modules == DEFAULT_SIGNATURE_MODULES
        import_signature_modules(settings.modules, optional=OPTIONAL_DEFAULT_MODULES if default else frozenset())
    for sig in app.dspex_signatures:
        register_signature(app, sig)
    register_map_task(app)
    register_optimize_tasks(app)
    register_scheduled_task(app)
    _connect_prewarm(app)
    return app


def _connect_prewarm(app: DspexCelery) -> None:
    def on_process_init(**_: Any) -> None:
        app.reset_runtime()  # a forked child must not share its parent's connections
        app.runtime  # noqa: B018 - warms the child

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        settings = app.dspex_settings
        redact.install(settings)  # secrets masked in logs and errors from here on (docs/reliability.md)
        route_dspy_logging()
        # kombu inflates a compressed body before any Celery hook sees it: bound it in this process first.
        install_decompression(settings.accept_compression, settings.max_payload_bytes)
        unmask_logged_urls(app)
        try:
            # Before Celery's consumer starts: it would retry a dead broker for ever, and say little.
            preflight(settings)
        except RedisUnreachable as exc:
            fail_to_start(exc)
            raise SystemExit(EXIT_UNAVAILABLE) from None
        if not app.dspex_settings.log_each_task:
            # Two INFO lines per task cost more than the task at thousands per second;
            # Flower, events and metrics carry the same facts.
            logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
            logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
        try:
            if app.conf.worker_pool != "prefork":
                app.runtime  # noqa: B018 - warms the only process that runs tasks
            else:  # children warm themselves; the parent still refuses an unsafe Redis
                check_eviction_policy(redis_client(app.dspex_settings), app.dspex_settings.allow_unsafe_eviction)
        except ConfigurationError as exc:
            # Celery logs and swallows exceptions from signal handlers; a worker that
            # must not run has to stop here, before it consumes anything.
            fail_to_start(exc)
            raise SystemExit(78) from None

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is app:  # logging is set up by now: the line lands in the worker's log
            log.info("dspex worker %s: %s", getattr(sender, "hostname", ""), redis_line(app.dspex_settings))

    def on_shutdown(**_: Any) -> None:
        app.reset_runtime()

    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    prometheus.install(app)
    tracing.install(app.dspex_settings)
