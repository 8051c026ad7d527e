"""The Celery app: its configuration, derived from settings in one place, and the app class.

``celery_config(settings)`` is the one place Celery's configuration comes from. ``create_app()`` is the
app clients, Flower and beat use (no tasks); the deployable worker app, with every task and the pre-warm
hooks, is :func:`dspex_tasks.worker.app.create_worker_app` (what ``workers/app.py`` deploys).
"""

from __future__ import annotations

import threading
from functools import cached_property, partial
from typing import Any

from celery import Celery
from kombu import entity

from . import wire
from .connections import HEALTH_CHECK_INTERVAL_S
from .dsl.signature import SignatureRegistry, registry
from .optimize.schedules import beat_config
from .settings import Settings, load_settings
from .worker.guard import DspexTask

__all__ = ["DspexCelery", "celery_config", "create_app"]


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
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "socket_keepalive": True,
        "retry_on_timeout": True,
        # A read that waits longer than this means Redis is gone or stopped: fail and reconnect
        # rather than block a consumer (or a client's get()) for redis-py's default forever.
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        # kombu's pool per connection (default 10, non-blocking: the 11th concurrent publish failed).
        "max_connections": settings.redis_max_connections,
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
        "redis_backend_health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "redis_socket_timeout": settings.redis_socket_timeout_s,
        "redis_socket_connect_timeout": settings.redis_socket_timeout_s,
        "redis_retry_on_timeout": False,  # Celery's own retry policy (above) bounds the retries
        "redis_socket_keepalive": True,
        # The backend's pool (blocking, waiting DSPEX_REDIS_POOL_WAIT_S: DspexCelery._get_backend).
        "redis_max_connections": settings.redis_max_connections,
        "broker_connection_retry_on_startup": True,
        "result_expires": settings.result_expires_s,
        "result_extended": True,
        # STARTED costs a read, a write and a publish per task; Flower sees it from events anyway.
        "task_track_started": settings.track_started,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_default_queue": settings.predict_queue,
        # A worker started without -Q consumes all of these, however it was started (dspex worker or
        # celery -A workers.app worker), including the queue a zero-configuration Celery client sends to.
        "task_queues": [_queue(q) for q in settings.queues],
        "task_routes": wire.task_routes(settings.predict_queue, settings.optimize_queue),
        "worker_hijack_root_logger": False,
        # Dead-letters every message Celery refuses (dspex_tasks.worker.intake).
        "worker_consumer": "dspex_tasks.worker.intake:Consumer",
        "enable_utc": True,
    }


def _queue(name: str) -> Any:
    """A direct queue bound to an exchange and routing key of its own name (what Celery creates for a name)."""
    queue_cls: Any = entity.Queue
    exchange_cls: Any = entity.Exchange
    return queue_cls(name, exchange_cls(name, type="direct"), routing_key=name)


class DspexCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries our settings and, in workers, the per-process runtime."""

    def __init__(self, settings: Settings, *, signatures: SignatureRegistry | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("task_cls", DspexTask)
        super().__init__(kwargs.pop("main", "dspex"), **kwargs)
        self.dspex_settings = settings
        self.dspex_signatures = signatures or registry
        self.conf.update(celery_config(settings))
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

    @cached_property
    def Worker(self) -> Any:  # noqa: N802 - Celery's name
        """Celery's worker class, with a truthful banner (see :class:`~dspex_tasks.worker.startup.DspexWorkerMixin`)."""
        from celery.apps.worker import Worker

        from .worker.startup import DspexWorkerMixin

        return self.subclass_with_self(type("Worker", (DspexWorkerMixin, Worker), {}))

    def _get_backend(self) -> Any:
        """Celery's backend; a Redis one gets a blocking pool (Celery's own raises at its cap instead of waiting)."""
        from celery.app import backends
        from celery.backends.redis import RedisBackend, SentinelBackend

        backend_cls, url = backends.by_url(self.backend_cls or self.conf.result_backend, self.loader)
        if isinstance(backend_cls, type) and issubclass(backend_cls, RedisBackend) \
                and not issubclass(backend_cls, SentinelBackend):
            import redis

            pool = partial(redis.BlockingConnectionPool, timeout=self.dspex_settings.redis_pool_wait_s)
            return backend_cls(app=self, url=url, connection_pool=pool)
        return backend_cls(app=self, url=url)

    def reset_runtime(self) -> None:
        with self._runtime_lock:
            if self._runtime is not None:
                self._runtime.close()
            self._runtime = None


def create_app(settings: Settings | None = None, **kwargs: Any) -> DspexCelery:
    """A Celery app configured from settings, with no tasks (clients, Flower, beat)."""
    return DspexCelery(settings or load_settings(), **kwargs)
