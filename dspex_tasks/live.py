"""Live events and cancellation of jobs (ARCHITECTURE 3.6), for workers, clients and the gateway alike.

A job submitted with ``stream=True`` writes its events to a Redis Stream of its own
(:func:`dspex_tasks.keys.job_events`), bounded in length (``DSPEX_STREAM_MAXLEN``) and expiring
``DSPEX_STREAM_TTL_S`` after its last event, so a stream nobody follows goes away by itself. Any number of
followers replay it from the start (or resume after an entry id: the SSE ``Last-Event-ID``). Every event is
a JSON object with ``"type"``:

- ``status``: ``{"state": "running" | "retrying" | "requeued", "attempt"?}``
- ``step``: a module or predictor started or ended: ``{"phase": "start" | "end", "name", "kind":
  "module" | "predictor", "error"?}``
- ``tool``: ``{"phase": "start", "name", "arguments"}`` then ``{"phase": "end", "name", "result" | "error"}``
- ``token``: ``{"field", "chunk", "predictor"}``; with ``"reset": true`` the field starts over (a retried or
  repeated LM call, ``Refine``/``BestOfN`` attempts): the chunks of a field since its last reset, joined, equal
  that field of the final output.
- last, ``result`` (``{"result": <the job's result JSON>}``) or ``error`` (``{"error": {"type", "message",
  ...}}``).

Events read back carry ``"id"`` (the stream entry id) and ``"ts"`` (unix seconds). The final event is written
just before Celery stores the job's result: a follower that reads it and then asks for the job's state may
still see it running for a moment (``Job.get()`` waits for the stored result).

Cancellation: :func:`request_cancel` writes the job's cancel key (expiring with its result); a worker reads
it when the job starts and before every LM call, and the job ends as ``errors.Cancelled`` with nothing
written. A job's ``timeout_s`` is checked at the same points.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from . import keys

__all__ = ["EVENT_TYPES", "FINAL_TYPES", "EventWriter", "EventFlusher", "read_events", "aread_events", "request_cancel",
           "cancel_reason", "entry_event"]

log = logging.getLogger(__name__)

#: What ``"type"`` an event may have.
EVENT_TYPES = ("status", "step", "tool", "token", "result", "error")
#: A stream ends with one of these.
FINAL_TYPES = frozenset({"result", "error"})


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_event(entry_id: Any, fields: Any) -> dict[str, Any]:
    """The event of one stream entry, with its ``id``."""
    raw = fields.get(b"e", fields.get("e"))
    event: dict[str, Any] = json.loads(raw)
    event["id"] = _s(entry_id)
    return event


class EventWriter:
    """Writes one job's events (a worker's side) through the process's :class:`EventFlusher`: ``emit`` only
    queues (it is called from DSPy's callbacks, on the job's thread or the process's event loop), a background
    thread pipelines the queued events of every job into Redis every few milliseconds, and :meth:`flush` waits
    for this job's (before its result is stored, so a follower sees the final event first)."""

    def __init__(self, redis: Any, namespace: str, job_id: str, *, maxlen: int, ttl_s: int) -> None:
        self.key = keys.job_events(namespace, job_id)
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self._flusher = EventFlusher.for_client(redis)

    def emit(self, event_type: str, **fields: Any) -> None:
        event = {"type": event_type, **fields, "ts": round(time.time(), 6)}
        self._flusher.put(self.key, json.dumps(event, separators=(",", ":"), default=str), self.maxlen, self.ttl_s)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every event emitted so far is written; False when Redis did not take them in time."""
        return self._flusher.flush(timeout_s)


class EventFlusher:
    """One per process and Redis client: a daemon thread writing queued events in pipelined batches.

    Events of one job keep their order (one queue, written in order). A batch that Redis refuses is logged and
    dropped: events are best effort, the job's result is what it promises.
    """

    _instances: dict[tuple[int, int], EventFlusher] = {}
    _lock = threading.Lock()

    @classmethod
    def for_client(cls, redis: Any) -> EventFlusher:
        key = (os.getpid(), id(redis))
        found = cls._instances.get(key)
        if found is None:
            with cls._lock:
                found = cls._instances.get(key)
                if found is None:
                    found = cls._instances[key] = cls(redis)
        return found

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._queue: collections.deque[tuple[str, str, int, int]] = collections.deque()
        self._cv = threading.Condition()
        self._queued = 0
        self._written = 0
        self._failed = 0
        threading.Thread(target=self._run, name="dspex-live-events", daemon=True).start()

    def put(self, key: str, event: str, maxlen: int, ttl_s: int) -> None:
        with self._cv:
            self._queue.append((key, event, maxlen, ttl_s))
            self._queued += 1
            self._cv.notify_all()

    def flush(self, timeout_s: float) -> bool:
        with self._cv:
            target = self._queued
            return self._cv.wait_for(lambda: self._written >= target, timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._queue))
                batch = list(self._queue)
                self._queue.clear()
            try:
                pipe = self.redis.pipeline(transaction=False)
                ttls: dict[str, int] = {}
                for key, event, maxlen, ttl_s in batch:
                    pipe.xadd(key, {"e": event}, maxlen=maxlen, approximate=True)
                    ttls[key] = ttl_s
                for key, ttl_s in ttls.items():
                    pipe.expire(key, ttl_s)
                pipe.execute()
            except Exception as exc:  # noqa: BLE001 - events are best effort
                self._failed += len(batch)
                log.warning("could not write %d live event(s): %s", len(batch), exc)
            with self._cv:
                self._written += len(batch)
                self._cv.notify_all()


def read_events(redis: Any, namespace: str, job_id: str, *, after: str = "0-0", block_ms: int = 1000,
                timeout_s: float | None = None, on_idle: Callable[[], dict[str, Any] | None] | None = None
                ) -> Iterator[dict[str, Any]]:
    """A job's events from the start (or after entry id ``after``), waiting for new ones until the final one.

    ``on_idle`` is asked after every quiet ``block_ms``: it returns a final event when the job has ended
    without one in the stream (it was not streamed, or its stream expired), which is yielded last.

    Raises:
        TaskTimeout: no final event within ``timeout_s``.
    """
    key = keys.job_events(namespace, job_id)
    last = after
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        reply = redis.xread({key: last}, count=500, block=_block_ms(deadline, block_ms, job_id, timeout_s))
        if not reply:
            final = on_idle() if on_idle is not None else None
            if final is not None:
                # The job ended: take what raced the check, then the final event if the stream had none.
                events, ended = _upto_final(redis.xread({key: last}, count=10_000))
                yield from events
                if not ended:
                    yield final
                return
            continue
        events, ended = _upto_final(reply)
        for event in events:
            last = event["id"]
            yield event
        if ended:
            return


async def aread_events(aredis: Any, namespace: str, job_id: str, *, after: str = "0-0", block_ms: int = 1000,
                       timeout_s: float | None = None, on_idle: Callable[[], Any] | None = None
                       ) -> AsyncIterator[dict[str, Any]]:
    """:func:`read_events` on an asyncio Redis client; ``on_idle`` may be a coroutine function."""
    import inspect

    key = keys.job_events(namespace, job_id)
    last = after
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        reply = await aredis.xread({key: last}, count=500, block=_block_ms(deadline, block_ms, job_id, timeout_s))
        if not reply:
            final = on_idle() if on_idle is not None else None
            if inspect.isawaitable(final):
                final = await final
            if final is not None:
                events, ended = _upto_final(await aredis.xread({key: last}, count=10_000))
                for event in events:
                    yield event
                if not ended:
                    yield final
                return
            continue
        events, ended = _upto_final(reply)
        for event in events:
            last = event["id"]
            yield event
        if ended:
            return


def _block_ms(deadline: float | None, block_ms: int, job_id: str, timeout_s: float | None) -> int:
    """How long the next XREAD may block: ``block_ms``, or less when the follower's deadline is nearer.

    Raises:
        TaskTimeout: the deadline has passed.
    """
    if deadline is None:
        return block_ms
    left = deadline - time.monotonic()
    if left <= 0:
        from .errors import TaskTimeout

        raise TaskTimeout(f"job {job_id} did not end within {timeout_s} s")
    return max(1, min(block_ms, int(left * 1000)))


def _upto_final(reply: Any) -> tuple[list[dict[str, Any]], bool]:
    """The events of an XREAD reply up to the final one, and whether it was among them."""
    events = []
    for event in _entries(reply):
        events.append(event)
        if event["type"] in FINAL_TYPES:
            return events, True
    return events, False


def _entries(reply: Any) -> Iterator[dict[str, Any]]:
    for _, entries in reply or ():
        for entry_id, fields in entries:
            yield entry_event(entry_id, fields)


def request_cancel(redis: Any, namespace: str, job_id: str, *, ttl_s: int, reason: str = "cancelled by request"
                   ) -> None:
    """Ask a job to stop: a queued one ends when a worker takes it, a running one before its next LM call.

    The cancel key holds the reason; the id also goes into a sorted set (by expiry) and out on a channel, from
    which every worker keeps a local copy (:class:`~dspex_tasks.worker.live.CancelWatch`), so checking a job
    costs no Redis round trip.
    """
    now = time.time()
    pipe = redis.pipeline(transaction=True)
    pipe.set(keys.job_cancel(namespace, job_id), json.dumps({"reason": reason, "at": now}), ex=ttl_s)
    pipe.zadd(keys.job_cancels(namespace), {job_id: now + ttl_s})
    pipe.zremrangebyscore(keys.job_cancels(namespace), "-inf", now)
    pipe.publish(keys.job_cancel_events(namespace), job_id)
    pipe.execute()


def cancel_reason(redis: Any, namespace: str, job_id: str) -> str | None:
    """Why the job was cancelled, or None when nobody asked."""
    raw = redis.get(keys.job_cancel(namespace, job_id))
    if raw is None:
        return None
    try:
        return str(json.loads(raw).get("reason") or "cancelled by request")
    except (ValueError, AttributeError):
        return "cancelled by request"
