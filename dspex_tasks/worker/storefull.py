"""A worker that survives a full Redis: result writes wait, consumption pauses, nothing is stored raw or lost.

Workers require ``maxmemory-policy noeviction``, so a Redis at its ``maxmemory`` refuses every write with
``OOM command not allowed when used memory > 'maxmemory'`` (Redis 7 refuses *any* command queued in a
MULTI then, even a ``ZREM``). Without this module the result of a task whose LM call succeeded was lost
(Celery's tracer gave up on the write and stored a raw ``OutOfMemoryError`` when it could), and a refused
acknowledgement ended the worker from its event loop. Here:

* :class:`StoreFullBackend` (Celery's Redis result backend, built by ``DspexCelery._get_backend``) retries a
  write Redis refuses as full, with backoff, for up to ``DSPEX_STORE_FULL_WAIT_S`` (180 s) from the task's
  own thread, and succeeds as soon as Redis has room. The first refusal logs one warning naming
  ``maxmemory``.
* :class:`StoreFullGate` pauses consumption meanwhile: the Celery consumer cancels its task queues (from the
  consumer's own thread, through ``Consumer.call_soon``) so no further message is fetched (and no LM is
  called for a result that could not be stored), and adds them back once a write succeeds (a waiting task's,
  or a probe's every few seconds).
* A task whose wait runs out, or that failed because Redis was full, fails as :class:`StoreFullRequeued`
  (an ``errors.StoreFull`` that Celery treats as a lost worker): nothing is stored, and its message goes back
  to its queue (``task_reject_on_worker_lost``) to run again. A full Redis is never a task's stored outcome.
* :func:`forget_unacked` and :func:`requeue_unacked` are the broker-side halves (acknowledge, requeue) that
  Redis accepts even when full, for the broker transport's ``QoS`` (:mod:`dspex_tasks.worker.fetch`).

The pause covers the threads and solo pools (the default is threads); a prefork child waits without pausing
its parent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import signals, states
from celery.backends.redis import RedisBackend

from ..connections import is_store_full, redacted_url, register_lua, store_full_error
from ..errors import StoreFull

__all__ = ["StoreFullBackend", "StoreFullGate", "StoreFullRequeued", "forget_unacked", "gate_for",
           "requeue_unacked"]

log = logging.getLogger(__name__)

#: First and longest pause between two attempts at a write Redis refused as full (doubling in between).
FIRST_RETRY_S = 0.25
MAX_RETRY_S = 5.0
#: A task id no task has: the probe ``LPUSHX``es its result key, which never exists, so it writes nothing.
_PROBE_TASK_ID = "dspex-store-full-probe"


class StoreFullRequeued(StoreFull, WorkerLostError):  # type: ignore[misc]
    """Raised when a task cannot record its outcome because Redis stayed full: nothing is stored and its
    message goes back to its queue to run again (Celery requeues a lost worker's message)."""


class StoreFullGate:
    """Whether this worker process takes messages: not while Redis refuses writes as full.

    One per app (:func:`gate_for`). It learns its Celery consumer from the ``task_received`` and
    ``worker_ready`` signals and changes what the consumer consumes only from the consumer's own thread.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._full_since: float | None = None
        self._backend: Any = None
        self._consumer: Any = None
        self._paused: list[str] = []
        self._probe: threading.Thread | None = None
        self._pid = os.getpid()
        # weak: a client process makes an app (and a gate) per Client; none of them may outlive its app
        signals.task_received.connect(self._on_consumer, weak=True)
        signals.worker_ready.connect(self._on_consumer, weak=True)

    @property
    def full(self) -> bool:
        """Whether Redis refused the last write this process tried (and no write succeeded since)."""
        return self._full_since is not None

    @property
    def paused_queues(self) -> list[str]:
        """The queues this worker stopped consuming because Redis is full."""
        return list(self._paused)

    def _on_consumer(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            self._consumer = sender

    def refused(self, backend: Any, wait_s: float) -> None:
        """A write was refused as full: warn once, stop consuming, and probe until Redis has room."""
        with self._lock:
            self._backend = backend
            if self._full_since is not None:
                return
            self._full_since = time.monotonic()
            if self._probe is None:  # else the running probe goes on: it stops only under this lock
                self._probe = threading.Thread(target=self._probe_until_writable, daemon=True,
                                               name="dspex-store-full-probe")
                self._probe.start()
        log.warning("Redis at %s is full (used memory > 'maxmemory', maxmemory-policy noeviction): it refuses "
                    "writes, so this worker takes no new messages and retries each result write for up to %g s "
                    "(DSPEX_STORE_FULL_WAIT_S) before requeueing its task; free memory or raise maxmemory",
                    redacted_url(str(getattr(backend, "url", "") or "")), wait_s)
        self._schedule()

    def writable(self) -> None:
        """A write succeeded: take messages again (if they were paused)."""
        if self._full_since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._full_since = self._full_since, None
        if since is None:
            return
        log.info("Redis accepts writes again after %.1f s full: this worker takes messages again",
                 time.monotonic() - since)
        self._schedule()

    def _schedule(self) -> None:
        consumer = self._consumer
        if consumer is None or os.getpid() != self._pid:  # no consumer here (a client, a prefork child)
            return
        consumer.call_soon(self._reconcile)  # thread-safe: runs on the consumer's event loop

    def _reconcile(self) -> None:
        """On the consumer's thread: consume nothing while full, every paused queue again once not."""
        consumer = self._consumer
        tasks = getattr(consumer, "task_consumer", None)
        if tasks is None:
            return
        if self.full:
            for queue in list(tasks.queues):
                consumer.cancel_task_queue(queue.name)
                self._paused.append(queue.name)
            return
        while self._paused:
            try:
                consumer.add_task_queue(self._paused[0])  # declares the queue: a write, refused when full
            except Exception as exc:
                if is_store_full(exc) and self._backend is not None:
                    self.refused(self._backend, float(getattr(self._backend, "store_full_wait_s", 0)))
                else:
                    log.warning("could not consume %s again (retrying in 1 s): %r", self._paused[0], exc)
                    consumer.timer.call_after(1.0, self._reconcile)
                return
            self._paused.pop(0)

    def _probe_until_writable(self) -> None:
        delay = FIRST_RETRY_S
        while True:
            with self._lock:
                if self._full_since is None:
                    self._probe = None
                    return
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)
            backend = self._backend
            try:  # a write Redis refuses when full, and that never changes anything (the key never exists)
                backend.client.lpushx(backend.get_key_for_task(_PROBE_TASK_ID), "")
            except Exception as exc:
                if is_store_full(exc) or isinstance(exc, backend.connection_errors):
                    continue
            self.writable()


_GATES_LOCK = threading.Lock()


def gate_for(app: Any) -> StoreFullGate:
    """The app's one gate, shared by every result backend the app makes."""
    with _GATES_LOCK:
        gate = app.__dict__.get("_dspex_store_full_gate")
        if gate is None:
            gate = app.__dict__["_dspex_store_full_gate"] = StoreFullGate(app)
        return gate  # type: ignore[no-any-return]


class StoreFullBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, for a Redis that may fill up (see the module).

    Args:
        store_full_wait_s: How long a task's write waits for a full Redis to take it (``DSPEX_STORE_FULL_WAIT_S``).
    """

    def __init__(self, *args: Any, store_full_wait_s: float = 180.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store_full_wait_s = float(store_full_wait_s)
        self.gate = gate_for(self.app)

    def _in_task(self, task_id: str) -> bool:
        """Whether this thread runs task ``task_id`` now (else: a consumer thread, a client; never wait there)."""
        task = self.app.current_worker_task
        return task is not None and getattr(task.request, "id", None) == task_id

    def store_result(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None,
                     **kwargs: Any) -> Any:
        deadline: float | None = None
        delay = FIRST_RETRY_S
        while True:
            try:
                stored = super().store_result(task_id, result, state, traceback, request, **kwargs)
            except Exception as exc:
                if not is_store_full(exc):
                    raise
                self.gate.refused(self, self.store_full_wait_s)
                now = time.monotonic()
                deadline = now + self.store_full_wait_s if deadline is None else deadline
                if not self._in_task(task_id):
                    raise store_full_error(str(self.url or "")) from exc
                if now >= deadline:
                    if state in states.READY_STATES:
                        raise StoreFullRequeued(
                            f"task {task_id}: Redis stayed full for {self.store_full_wait_s:g} s "
                            "(DSPEX_STORE_FULL_WAIT_S), so its result was not stored; its message goes back to "
                            "its queue to run again") from exc
                    log.warning("task %s: state %s not stored, Redis is full", task_id, state)  # STARTED, RETRY
                    return result
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, MAX_RETRY_S)
                continue
            self.gate.writable()
            return stored

    def mark_as_failure(self, task_id: str, exc: BaseException, traceback: Any = None, request: Any = None,
                        store_result: bool = True, call_errbacks: bool = True,
                        state: str = states.FAILURE) -> Any:
        """A failure that is Redis being full is never a stored outcome: the task runs again instead."""
        if isinstance(exc, StoreFullRequeued):
            return None  # nothing happened that counts: no result, no chord part, no errback
        if state == states.FAILURE and is_store_full(exc):
            if self._in_task(task_id):
                self.gate.refused(self, self.store_full_wait_s)
                raise StoreFullRequeued(f"task {task_id} failed because Redis is full ({exc}); its message goes "
                                        "back to its queue to run again") from exc
            exc = store_full_error(str(self.url or ""))  # Celery drops this message: say why, typed
        return super().mark_as_failure(task_id, exc, traceback, request, store_result, call_errbacks, state)


def forget_unacked(client: Any, unacked_key: str, unacked_index_key: str, tag: str) -> None:
    """Acknowledge ``tag``: remove it from kombu's unacked hash and index, even when Redis is full.

    kombu's ``QoS.ack`` sends both in a MULTI, which Redis 7 refuses as a whole when full, and its refusal
    (``OutOfMemoryError``, not a connection error) ended the worker from its event loop. ``HDEL`` and ``ZREM``
    free memory, so Redis accepts them one by one. The hash entry goes first: a crash in between leaves only
    an index entry, which kombu's restore drops (nothing to restore).
    """
    pipe = client.pipeline(transaction=False)
    pipe.hdel(unacked_key, tag)
    pipe.zrem(unacked_index_key, tag)
    pipe.execute()


def requeue_unacked(qos: Any, tag: str, *, leftmost: bool = False) -> bool:
    """Put unacked message ``tag`` back on its queue(s), as kombu's ``QoS.restore_by_tag`` does, even when
    Redis is full. Returns False when it was no longer unacked (already acknowledged or restored).

    One script moves it: it deletes the hash entry first (which frees memory, so Redis lets the script go
    on writing when full) and pushes it on its queue(s) only if it was still there, so a concurrent restore
    never doubles it. The message is marked ``redelivered`` as kombu marks it.
    """
    from kombu.utils.encoding import bytes_to_str
    from kombu.utils.json import dumps, loads

    channel = qos.channel
    with channel.conn_or_acquire() as client:
        raw = client.hget(qos.unacked_key, tag)
        if raw is None:
            client.zrem(qos.unacked_index_key, tag)
            return False
        payload, exchange, routing_key = loads(bytes_to_str(raw))  # type: ignore[no-untyped-call]
        for part in (payload.get("headers"), (payload.get("properties") or {}).get("delivery_info")):
            if isinstance(part, dict):
                part["redelivered"] = True
        priority = channel._get_message_priority(payload, reverse=False)
        queues = [channel._q_for_pri(queue, priority) for queue in channel._lookup(exchange, routing_key)]
        if not queues:  # no binding: leave it for kombu's restore rather than drop it
            return False
        script = register_lua(client, __name__, "requeue_unacked")
        moved = script(keys=[qos.unacked_key, qos.unacked_index_key, *queues],
                       args=[tag, dumps(payload), "left" if leftmost else "right"],  # type: ignore[no-untyped-call]
                       client=client)
        return bool(moved)
