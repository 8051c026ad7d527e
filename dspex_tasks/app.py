"""The Celery app factory, its configuration, and signatures as typed tasks.

``celery_config(settings)`` is the one place Celery's configuration comes from.
``create_worker_app()`` is what ``workers/app.py`` deploys: it imports the
signature modules, registers ``dspex.<name>`` for each, and pre-warms each
worker process through Celery's signals.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from celery import Celery, signals

from .dsl.signature import Signature, SignatureRegistry, registry
from .errors import (
    ConfigurationError,
    DspexError,
    InvalidSession,
    LMContextLengthExceeded,
    LMError,
    LMTimeout,
    UnknownSignature,
    ValidationError,
)
from .lm.ratelimit import RateLimited, claim_from, lm_retries, requeue
from .settings import Settings, load_settings

# Expected failures: recorded as FAILURE and logged without a traceback.
EXPECTED_ERRORS = (ValidationError, UnknownSignature, InvalidSession)

__all__ = ["DspexCelery", "celery_config", "create_app", "create_worker_app", "register_signature"]

log = logging.getLogger(__name__)

MAP_TASK = "dspex.map"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours. JSON only; late acks; LLM-friendly timeouts."""
    transport = {
        # A message unacked this long is redelivered: longer than any single task may run.
        "visibility_timeout": settings.visibility_timeout_s,
        # Kombu scans for expired unacked messages every interval x throttle seconds (100 s by
        # default); a killed worker's messages should come back soon after the timeout.
        "unacked_restore_interval": max(1, min(30, settings.visibility_timeout_s // 10)),
        "unacked_restore_throttle": 1,
        # A worker killed while it held the restore mutex blocks every other restore until the
        # mutex expires (kombu: 300 s). Restores take milliseconds; 15 s is plenty.
        "unacked_mutex_expire": 15,
        "health_check_interval": 25,
        "socket_keepalive": True,
        "retry_on_timeout": True,
        # A read that waits longer than this means Redis is gone or stopped: fail and reconnect
        # rather than block a consumer (or a client's get()) for redis-py's default forever.
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
    }
    return {
        "broker_url": settings.broker,
        "result_backend": settings.backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "worker_pool": settings.worker_pool,
        "worker_concurrency": settings.worker_concurrency,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_transport_options": transport,
        # Give up on a lost result backend after a few seconds (Celery's default retries for
        # ~20 s), so a client's get() fails clearly instead of seeming to hang.
        "result_backend_transport_options": {"retry_policy": {
            "max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1, "timeout": 5.0}},
        "redis_backend_health_check_interval": 25,
        "redis_socket_timeout": settings.redis_socket_timeout_s,
        "redis_socket_connect_timeout": settings.redis_socket_timeout_s,
        "redis_retry_on_timeout": False,  # Celery's own retry policy (above) bounds the retries
        "redis_socket_keepalive": True,
        "broker_connection_retry_on_startup": True,
        "result_expires": settings.result_expires_s,
        "result_extended": True,
        # STARTED costs a read, a write and a publish per task; Flower sees it from events anyway.
        "task_track_started": settings.track_started,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_default_queue": settings.predict_queue,
        "task_routes": {
            "dspex.optimize.*": {"queue": settings.optimize_queue},
            "dspex.*": {"queue": settings.predict_queue},
        },
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


class DspexCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries our settings and, in workers, the per-process runtime."""

    def __init__(self, settings: Settings, *, signatures: SignatureRegistry | None = None, **kwargs: Any) -> None:
        from .worker.guard import DspexTask

        kwargs.setdefault("task_cls", DspexTask)
        super().__init__(kwargs.pop("main", "dspex"), **kwargs)
        self.dspex_settings = settings
        self.dspex_signatures = signatures or registry
        self.conf.update(celery_config(settings))
        from .optimize.schedules import beat_config

        self.conf.update(beat_config(settings))
        self._runtime: Any = None
        self._runtime_lock = threading.Lock()

    @property
    def runtime(self) -> Any:
        """The process's :class:`~dspex_tasks.worker.runtime.Runtime`, created (and warmed) on first use."""
        if self._runtime is None:
            with self._runtime_lock:
                if self._runtime is None:
                    from .worker.runtime import Runtime

                    rt = Runtime(self.dspex_settings, signatures=self.dspex_signatures)
                    rt.warm()
                    self._runtime = rt
        return self._runtime

    def reset_runtime(self) -> None:
        with self._runtime_lock:
            if self._runtime is not None:
                self._runtime.close()
            self._runtime = None


def create_app(settings: Settings | None = None, **kwargs: Any) -> DspexCelery:
    """A Celery app configured from settings, with no tasks (clients, Flower, beat)."""
    return DspexCelery(settings or load_settings(), **kwargs)


def _reject_extra(sig_name: str, args: tuple[Any, ...], extra: dict[str, Any]) -> None:
    errors = [{"field": k, "message": "unexpected task argument; expected inputs, session, program"}
              for k in extra]
    if args:
        errors.append({"field": "args", "message": "positional arguments are not accepted; send kwargs"})
    if errors:
        raise ValidationError.from_errors(f"task arguments for 'dspex.{sig_name}'", errors)


def _check_size(app: DspexCelery, value: Any, field: str) -> None:
    limit = app.dspex_settings.max_payload_bytes
    size = len(json.dumps(value, separators=(",", ":"), default=str))
    if size > limit:
        raise ValidationError.from_errors(
            "payload", [{"field": field, "message": f"{size} bytes exceeds the {limit}-byte payload limit"}])


def register_signature(app: DspexCelery, sig: Signature) -> Any:
    """Register ``dspex.<name>`` for ``sig`` on ``app`` and return the task."""

    def run(self: Any, *args: Any, inputs: Any = None, session: str | None = None, program: str | None = None,
            **extra: Any) -> dict[str, Any]:
        _reject_extra(sig.name, args, extra)
        _check_size(self.app, inputs, "inputs")
        settings = self.app.dspex_settings
        claim_from(self.request)  # a rate-limit slot reserved for this task when it was re-queued
        try:
            result: dict[str, Any] = self.app.runtime.predict(sig, inputs, session, program)
        except RateLimited as exc:  # re-queued with a countdown, on a budget of its own
            raise requeue(self, exc, max_requeues=settings.rate_limit_max_requeues,
                          max_retries=settings.task_max_retries) from None
        except LMError as exc:
            if _retryable(exc) and lm_retries(self.request) < settings.task_max_retries:
                raise self.retry(exc=exc, countdown=min(2 ** lm_retries(self.request), 30)) from None
            raise
        result["task_id"] = self.request.id
        return result

    task = app.task(name=f"dspex.{sig.name}", bind=True, shared=False, typing=False, acks_late=True, throws=EXPECTED_ERRORS,
                    reject_on_worker_lost=True, queue=app.dspex_settings.predict_queue,
                    max_retries=None)(run)  # budgets are ours: DSPEX_TASK_MAX_RETRIES, DSPEX_RATE_LIMIT_MAX_REQUEUES
    sig.task = task
    return task


def _retryable(exc: DspexError) -> bool:
    from .worker.runtime import RETRYABLE_LM_ERRORS

    if isinstance(exc, LMTimeout | LMContextLengthExceeded):
        return False
    return any(f"({name})" in exc.message for name in RETRYABLE_LM_ERRORS)


def register_map_task(app: DspexCelery) -> Any:
    """``dspex.map``: many inputs of one signature in one message (``Client.map``)."""

    def run_map(self: Any, *args: Any, signature: str = "", items: Any = None, session: str | None = None,
                program: str | None = None, **extra: Any) -> dict[str, Any]:
        _reject_extra(signature, args, extra)
        sig = self.app.dspex_signatures.find(signature)
        if sig is None:
            raise UnknownSignature(f"unknown signature '{signature}' on worker")
        if not isinstance(items, list):
            raise ValidationError.from_errors("map items", [{"field": "items", "message": "expected a list"}])
        _check_size(self.app, items, "items")
        return {"results": self.app.runtime.predict_many(sig, items, session, program)}

    return app.task(name=MAP_TASK, bind=True, shared=False, typing=False, acks_late=True, reject_on_worker_lost=True,
                    throws=EXPECTED_ERRORS,
                    queue=app.dspex_settings.predict_queue)(run_map)


def create_worker_app(settings: Settings | None = None, *, signatures: SignatureRegistry | None = None,
                      import_modules: bool = True) -> DspexCelery:
    """The deployable app: settings, signature modules, tasks, and pre-warm hooks."""
    settings = settings or load_settings()
    app = DspexCelery(settings, signatures=signatures)
    if import_modules:
        from .worker.runtime import import_signature_modules

        import_signature_modules(settings.modules)
    for sig in app.dspex_signatures:
        register_signature(app, sig)
    register_map_task(app)
    from .optimize.stages import register_optimize_tasks

    register_optimize_tasks(app)
    from .optimize.schedules import register_scheduled_task

    register_scheduled_task(app)
    _connect_prewarm(app)
    return app


def _connect_prewarm(app: DspexCelery) -> None:
    def on_process_init(**_: Any) -> None:
        app.reset_runtime()  # a forked child must not share its parent's connections
        app.runtime  # noqa: B018 - warms the child

    def on_worker_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        if not app.dspex_settings.log_each_task:
            # Two INFO lines per task cost more than the task at thousands per second;
            # Flower, events and metrics carry the same facts.
            logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
            logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
        try:
            if app.conf.worker_pool != "prefork":
                app.runtime  # noqa: B018 - warms the only process that runs tasks
            else:  # children warm themselves; the parent still refuses an unsafe Redis
                import redis as redis_lib

                from .worker.runtime import check_eviction_policy

                check_eviction_policy(redis_lib.Redis.from_url(app.dspex_settings.redis_url),
                                      app.dspex_settings.allow_unsafe_eviction)
        except ConfigurationError as exc:
            # Celery logs and swallows exceptions from signal handlers; a worker that
            # must not run has to stop here, before it consumes anything.
            log.critical("refusing to start: %s", exc)
            raise SystemExit(78) from None

    def on_shutdown(**_: Any) -> None:
        app.reset_runtime()

    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_init.connect(on_worker_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    from .observability import prometheus as metrics_prom
    from .observability import tracing
    metrics_prom.install(app)
    tracing.install()


def error_payload(exc: BaseException) -> dict[str, Any]:
    """JSON description of an error (for map items and logs)."""
    return {"type": type(exc).__name__, "args": list(exc.args) if isinstance(exc, DspexError) else [str(exc)]}
