"""The status model: workers, queue depths, program cache counters, task metrics and sessions, as JSON-ready data.

``dspex status`` renders it (:mod:`dspex_tasks.cli.status`); ``dspex health`` and the gateway read it too.

Cache counters and task metrics come from the hash each worker process refreshes in Redis every few
seconds (``keys.worker_stats``; its ``metrics`` field is :func:`dspex_tasks.observability.prometheus.snapshot_json`),
summed over the processes alive now (since each one started).
"""

from __future__ import annotations

import contextlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from .. import keys
from ..connections import amqp_connection, redacted_url, redis_client, unreachable_message
from ..errors import ConfigurationError
from ..wire import SENT_AT_HEADER

__all__ = ["collect_status", "queue_depth", "queue_lists", "oldest_queue_age", "oldest_message_age", "SENT_AT_HEADERS",
           "amqp_queue_depths", "broker_queue_depths", "worker_stats", "queue_consumers", "unconsumed",
           "unconsumed_message"]

_CACHE_FIELDS = ("hits", "misses", "evictions", "invalidations", "size")


def queue_lists(queue: str) -> list[str]:
    """The Redis lists behind a kombu queue: the queue itself and one per priority step."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [f"{queue}{Channel.sep}{pri}" if pri else queue for pri in PRIORITY_STEPS]


def queue_depth(redis: Any, queue: str) -> int:
    """Messages waiting in a kombu Redis queue: the list named ``queue`` plus its priority lists."""
    pipe = redis.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.llen(name)
    return int(sum(pipe.execute()))


#: Message headers a producer may stamp with its send time (unix seconds or ISO 8601), first match wins.
#: Celery's protocol 2 carries none by default; ``dspex_sent_at`` is the one dspex producers can add.
SENT_AT_HEADERS = (SENT_AT_HEADER, "sent_at", "timestamp")


def oldest_queue_age(redis: Any, queue: str, now: float | None = None) -> tuple[float | None, str | None]:
    """Seconds since the oldest waiting message of a kombu Redis queue was sent (or fell due), and where that
    came from (:func:`oldest_message_age`); ``(None, None)`` when empty or unstamped. kombu pushes left and pops
    right: each list's tail is its oldest message."""
    now = time.time() if now is None else now
    age: float | None = None
    source: str | None = None
    for name in queue_lists(queue):
        item_age, item_source = oldest_message_age(redis.lindex(name, -1), now)
        if item_age is not None and (age is None or item_age > age):
            age, source = item_age, item_source
    return age, source


def _timestamp(value: Any) -> float | None:
    """Unix seconds from a number or an ISO 8601 string (naive means UTC); None when unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return float(value)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return None


def oldest_message_age(raw: bytes | str | None, now: float | None = None) -> tuple[float | None, str | None]:
    """Age in seconds of one kombu Redis message and where it came from, or ``(None, None)`` when unknown.

    A send time in the headers (:data:`SENT_AT_HEADERS`) or properties gives the age since sending; failing
    that, an ETA in the past gives the age since the task became due. Celery's protocol 2 stamps neither by
    default, so plain messages have no age (their queue depth is still reported).
    """
    if raw is None:
        return None, None
    try:
        message = json.loads(raw)
    except (TypeError, ValueError):
        return None, None
    if not isinstance(message, dict):
        return None, None
    now = time.time() if now is None else now
    headers: dict[str, Any] = message["headers"] if isinstance(message.get("headers"), dict) else {}
    properties: dict[str, Any] = message["properties"] if isinstance(message.get("properties"), dict) else {}
    for source, fields in (("headers", headers), ("properties", properties)):
        for key in SENT_AT_HEADERS:
            ts = _timestamp(fields.get(key))
            if ts is not None:
                return max(0.0, now - ts), f"{source}.{key}"
    eta = _timestamp(headers.get("eta"))
    if eta is not None:
        return max(0.0, now - eta), "headers.eta"
    return None, None




def amqp_queue_depths(connection: Any, queues: list[str]) -> dict[str, int]:
    """Messages ready in RabbitMQ queues, each from a passive ``queue.declare`` (which creates nothing).

    ``connection`` is a ``kombu.Connection`` (:func:`~dspex_tasks.connections.amqp_connection`). A queue that
    does not exist yet holds nothing: 0. As with Redis, messages a worker holds unacknowledged are not counted.
    Nothing is peeked at: a ``basic.get`` put back would mark the message redelivered (a delivery for the
    dead-letter guard), so a RabbitMQ queue's oldest message has no known age.
    """
    from amqp.exceptions import NotFound

    depths: dict[str, int] = {}
    channel = connection.channel()
    try:
        for queue in queues:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except NotFound:  # the broker closed the channel: the next queue gets a new one
                depths[queue] = 0
                channel = connection.channel()
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return depths


def broker_queue_depths(settings: Any, queues: list[str] | None = None, *, redis: Any = None,
                        timeout_s: float = 2.0) -> dict[str, int]:
    """Messages waiting in each queue (default: ``settings.queues``) of the broker, Redis or RabbitMQ.

    ``redis``: a client of the broker when it is Redis (default: one opened here, closed after).

    Raises:
        ConfigurationError: a RabbitMQ broker that did not answer within ``timeout_s``, naming the URL and
            ``DSPEX_BROKER_URL``.
    """
    names = settings.queues if queues is None else queues
    if settings.broker_is_redis:
        if redis is not None:
            return {q: queue_depth(redis, q) for q in names}
        conn = redis_client(settings, settings.broker)
        try:
            return {q: queue_depth(conn, q) for q in names}
        finally:
            conn.close()
    with amqp_connection(settings.broker, timeout_s) as connection:
        try:
            connection.ensure_connection(max_retries=0, timeout=timeout_s)
        except Exception as exc:  # refused, timed out, a bad login or vhost: one line, not a traceback
            raise ConfigurationError(unreachable_message("cannot reach RabbitMQ", settings.broker, exc,
                                                         variable="DSPEX_BROKER_URL")) from None
        return amqp_queue_depths(connection, names)


def _queue_depths(client: Any) -> dict[str, int | None]:
    """Depths from the broker (which may be another Redis than DSPEX_REDIS_URL, or RabbitMQ)."""
    s = client.settings
    redis = client.redis if s.broker == s.redis_url else None
    return dict(broker_queue_depths(s, redis=redis))


def queue_consumers(app: Any, timeout_s: float, workers: list[str] | None = None) -> dict[str, list[str]]:
    """``{queue: [worker, ...]}``: which live workers consume which queue (Celery's ``active_queues``).

    With ``workers`` (those that answered a ping) only they are asked, and the wait ends once they all answered.
    """
    if workers is not None and not workers:
        return {}
    inspect = app.control.inspect(timeout=timeout_s, destination=workers, limit=len(workers) if workers else None)
    consumers: dict[str, list[str]] = {}
    for worker, queues in sorted((inspect.active_queues() or {}).items()):
        for queue in queues or []:
            consumers.setdefault(str(queue.get("name")), []).append(worker)
    return consumers


def unconsumed(depths: dict[str, int | None], consumers: dict[str, list[str]]) -> dict[str, int]:
    """Queues with messages waiting and no live worker consuming them: they would wait for ever."""
    return {q: n for q, n in depths.items() if n and not consumers.get(q)}


def unconsumed_message(queues: dict[str, int]) -> str:
    """``dspex.optimize: 3 waiting, no worker consumes it (...)``, for status and health."""
    names = ",".join(queues)
    return ("; ".join(f"{q}: {n} waiting, no worker consumes it" for q, n in queues.items())
            + f" (start a worker without -Q, or with -Q {names})")


def _workers(app: Any, timeout_s: float) -> list[dict[str, Any]]:
    pings = app.control.inspect(timeout=timeout_s).ping() or {}
    stats: dict[str, Any] = {}
    consumers: dict[str, list[str]] = {}
    if pings:  # ask only those that answered, and stop waiting once they all did
        stats = app.control.inspect(timeout=timeout_s, destination=list(pings), limit=len(pings)).stats() or {}
        consumers = queue_consumers(app, timeout_s, list(pings))
    workers = []
    for name in sorted(pings):
        info = stats.get(name) or {}
        pool = info.get("pool") or {}
        workers.append({
            "name": name,
            "ok": pings[name] == {"ok": "pong"},
            "pid": info.get("pid"),
            # "celery.concurrency.thread:TaskPool" -> "thread"
            "pool": str(pool.get("implementation", "")).split(":", 1)[0].rsplit(".", 1)[-1] or None,
            "concurrency": pool.get("max-concurrency"),
            "processed": sum((info.get("total") or {}).values()),
            "uptime_s": info.get("uptime"),
            "queues": sorted(q for q, names in consumers.items() if name in names),
        })
    return workers


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def worker_stats(redis: Any, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(program cache counters, task metrics), each summed over the worker processes reporting now."""
    totals = dict.fromkeys(_CACHE_FIELDS, 0)
    metrics = _MetricsSum()
    processes = 0
    prefix = keys.worker_stats(namespace, "")
    for key in redis.scan_iter(match=keys.worker_stats_pattern(namespace), count=500):
        raw = redis.hgetall(key)
        if not raw:
            continue
        processes += 1
        values = {_text(k): v for k, v in raw.items()}
        for name in _CACHE_FIELDS:
            with contextlib.suppress(TypeError, ValueError):
                totals[name] += int(values.get(name, 0))
        if "metrics" in values:
            metrics.add(_text(key)[len(prefix):], values["metrics"])
    lookups = totals["hits"] + totals["misses"]
    hit_rate = round(totals["hits"] / lookups, 4) if lookups else None
    cache = {**totals, "processes": processes, "hit_rate": hit_rate}
    return cache, {**metrics.result(), "cache_hit_rate": hit_rate}


class _MetricsSum:
    """Adds up the ``metrics`` snapshots of several worker processes."""

    def __init__(self) -> None:
        self.processes = 0
        self.tasks: dict[str, dict[str, int]] = {}
        self.lm: dict[str, dict[str, float]] = {}
        self.runs: dict[str, dict[str, int]] = {}
        self.promotions: dict[str, int] = {}
        self.endpoints: set[str] = set()

    def add(self, worker_id: str, raw: Any) -> None:
        try:
            snap = json.loads(raw)
        except (TypeError, ValueError):
            return
        if not isinstance(snap, dict):
            return
        self.processes += 1
        for table, into in (("tasks", self.tasks), ("runs", self.runs)):
            for name, counts in (snap.get(table) or {}).items():
                row = into.setdefault(name, {})
                for outcome, n in (counts or {}).items():
                    row[outcome] = row.get(outcome, 0) + int(n)
        for model, usage in (snap.get("lm") or {}).items():
            row_lm = self.lm.setdefault(model, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                "cost_usd": 0.0})
            for field in row_lm:
                row_lm[field] += usage.get(field, 0) or 0
        for sig, n in (snap.get("promotions") or {}).items():
            self.promotions[sig] = self.promotions.get(sig, 0) + int(n)
        if snap.get("port") is not None:  # worker ids are "host:pid"
            self.endpoints.add(f"{worker_id.rsplit(':', 1)[0]}:{snap['port']}")

    def result(self) -> dict[str, Any]:
        by_outcome: dict[str, int] = {}
        for counts in self.tasks.values():
            for outcome, n in counts.items():
                by_outcome[outcome] = by_outcome.get(outcome, 0) + n
        lm = {m: {**u, "cost_usd": round(u["cost_usd"], 6)} for m, u in sorted(self.lm.items())}
        return {"processes": self.processes, "tasks": dict(sorted(self.tasks.items())), "tasks_total": by_outcome,
                "lm": lm, "optimization_runs": dict(sorted(self.runs.items())),
                "promotions": dict(sorted(self.promotions.items())), "endpoints": sorted(self.endpoints)}


def collect_status(client: Any, *, timeout_s: float = 1.0) -> dict[str, Any]:
    """Everything ``dspex status`` shows, as JSON-ready data."""
    s = client.settings
    redis = client.redis
    cache, metrics = worker_stats(redis, s.namespace)
    depths = _queue_depths(client)  # before the broadcast: a broker that is down is named here, in one line
    workers = _workers(client.app, timeout_s)
    consumers: dict[str, list[str]] = {}
    for w in workers:
        for q in w["queues"]:
            consumers.setdefault(q, []).append(w["name"])
    return {
        "redis_url": s.redis_url,
        "broker_url": redacted_url(s.broker),
        "namespace": s.namespace,
        "workers": workers,
        "queues": depths,
        "consumers": {q: consumers.get(q, []) for q in depths},
        "unconsumed": unconsumed(depths, consumers),
        "cache": cache,
        "metrics": metrics,
        "sessions": int(redis.zcard(keys.sessions(s.namespace))),
        "signatures": sorted(client.signatures(refresh=True)),
    }
