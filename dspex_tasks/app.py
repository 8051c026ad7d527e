"""The Celery app: its configuration, derived from settings in one place, and the app class.

``celery_config(settings)`` is the one place Celery's configuration comes from. ``create_app()`` is the
app clients, Flower and beat use (no tasks); the deployable worker app, with every task and the pre-warm
hooks, is :func:`dspex_tasks.worker.app.create_worker_app` (what ``workers/app.py`` deploys).
"""

from __future__ import annotations

import ssl
import threading
from functools import cached_property, partial
from typing import Any

from celery import Celery
from kombu import entity

from . import keys, wire
from .connections import HEALTH_CHECK_INTERVAL_S
from .dsl.signature import SignatureRegistry, registry
from .optimize.schedules import beat_config
from .settings import Settings, load_settings
from .worker.guard import DspexTask

__all__ = ["DspexCelery", "celery_config", "create_app"]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours. JSON only; late acks; LLM-friendly timeouts."""
    return {**_base_config(settings), **(_redis_broker(settings) if settings.broker_is_redis
                                         else _amqp_broker(settings))}


def _redis_broker(settings: Settings) -> dict[str, Any]:
    """A Redis broker: kombu's transport options, and our reliable fetch (:mod:`dspex_tasks.worker.fetch`)."""
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
        # where a queue entry that is not a message is set aside (dspex_tasks.worker.fetch)
        "dead_letter_key": keys.dead_letters(settings.namespace),
    }
    config: dict[str, Any] = {"broker_transport_options": transport}
    if settings.reliable_fetch:
        config["broker_transport"] = "dspex_tasks.worker.fetch:Transport"
        if settings.broker.startswith("rediss://"):
            # kombu's own rediss default is CERT_NONE (with a warning); an explicit transport skips even that
            config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def _amqp_broker(settings: Settings) -> dict[str, Any]:
    """A RabbitMQ broker: acks without a visibility timeout, publisher confirms, quorum queues on request.

    RabbitMQ hands a consumer's unacknowledged messages back the moment its connection or channel closes (no
    visibility timeout, no restore scan) and marks them ``redelivered``, which the dead-letter guard counts
    (:mod:`dspex_tasks.worker.guard`). Publisher confirms: a send returns once the broker has the message.

    ``DSPEX_AMQP_QUEUE_TYPE=quorum`` makes the dspex queues quorum queues (replicated, with a delivery count
    of their own). Their ``x-delivery-limit`` is a backstop behind the guard: RabbitMQ drops a message returned
    more often (one that kills its worker before the guard can run); the guard dead-letters a poison message
    after ``DSPEX_MAX_DELIVERIES``, long before. The limit is a constant, not that setting, because every
    client declares the queues it sends to and RabbitMQ refuses a declaration whose arguments differ: a
    setting would have to be the same in every process, and changing it would mean deleting the queues.
    Their exchanges are topic exchanges, so a countdown (a task retry) waits in RabbitMQ's native delayed
    delivery (``celery_delayed_*``, set up by each worker) instead of in a worker's memory. Celery's bare
    queue stays classic and direct: a Celery client with no dspex configuration declares it so.
    """
    config: dict[str, Any] = {"broker_transport_options": {"confirm_publish": True}}
    if settings.amqp_queue_type == "quorum":
        limit = max(QUORUM_DELIVERY_LIMIT, settings.max_deliveries + 1)  # the guard always gets its turn
        config["task_queues"] = [_queue(q) if q == settings.bare_queue else _quorum_queue(q, limit)
                                 for q in settings.queues]
    return config


#: ``x-delivery-limit`` of a quorum queue (RabbitMQ 4's own default): far above ``DSPEX_MAX_DELIVERIES`` (5).
QUORUM_DELIVERY_LIMIT = 20


def _quorum_queue(name: str, delivery_limit: int) -> Any:
    """A quorum queue bound to a topic exchange of its own name (native delayed delivery needs a topic one)."""
    queue_cls: Any = entity.Queue
    exchange_cls: Any = entity.Exchange
    return queue_cls(name, exchange_cls(name, type="topic"), routing_key=name,
                     queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": delivery_limit})


def _base_config(settings: Settings) -> dict[str, Any]:
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
        "task_send_sent_event": settings.sent_events,
        "worker_send_task_events": settings.task_events,
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
        """Celery's backend; a Redis one gets a blocking pool (Celery's own raises at its cap instead of waiting)
        and, when it is Celery's own Redis backend, survives a full Redis
        (:class:`~dspex_tasks.worker.storefull.StoreFullBackend`: writes wait, consumption pauses)."""
        from celery.app import backends
        from celery.backends.redis import RedisBackend, SentinelBackend

        backend_cls, url = backends.by_url(self.backend_cls or self.conf.result_backend, self.loader)
        if isinstance(backend_cls, type) and issubclass(backend_cls, RedisBackend) \
                and not issubclass(backend_cls, SentinelBackend):
            import redis

            pool = partial(redis.BlockingConnectionPool, timeout=self.dspex_settings.redis_pool_wait_s)
            if backend_cls is RedisBackend:
                from .worker.storefull import StoreFullBackend

                return StoreFullBackend(app=self, url=url, connection_pool=pool,
                                        store_full_wait_s=self.dspex_settings.store_full_wait_s)
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
