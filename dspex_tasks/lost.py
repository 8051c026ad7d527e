"""Telling a task lost with Redis's data from one that is merely slow.

A Redis restarted without persistence forgets every queued message, unacknowledged delivery and result; a
client waiting on such a task would otherwise wait out its whole timeout and get a bare ``TaskTimeout``. The
probe compares the broker's ``run_id`` (``INFO server``, new at every server start) captured at submit with the
current one; only when it changed does it look for the task: in its queue, in kombu's ``unacked`` hash, in the
result backend. Nowhere, twice in a row, means lost.
"""

from __future__ import annotations

import time
from typing import Any

from .observability.status import queue_lists

__all__ = ["LossProbe", "LossWatch", "server_run_id"]

#: Seconds a client waits before it first asks whether its task was lost, then at most once per this interval.
PROBE_AFTER_S = 3.0
PROBE_EVERY_S = 1.0


def server_run_id(redis: Any) -> str | None:
    """The Redis server's ``run_id``: a new random value each time the server starts."""
    run_id = redis.info("server").get("run_id")
    return str(run_id) if run_id else None


class LossProbe:
    """Whether one task vanished with Redis's data (the broker restarted, the task is nowhere).

    Args:
        task_id: the task's id.
        queue: the queue it was sent to.
        broker: a ``redis.Redis`` on the broker.
        result_exists: ``result_exists(task_id) -> bool``, whether the result backend holds its result.
        run_id: the broker's ``run_id`` when the task was sent (None: unknown, never reports a loss).
    """

    def __init__(self, task_id: str, queue: str, *, broker: Any, result_exists: Any, run_id: str | None) -> None:
        self.task_id = task_id
        self.queue = queue
        self.broker = broker
        self.result_exists = result_exists
        self.run_id = run_id
        self._misses = 0
        self._checked_at = 0.0

    def lost(self, *, force: bool = False) -> bool:
        """True once the task was found nowhere on two checks after a broker restart.

        At most one check per :data:`PROBE_EVERY_S` unless ``force``; an unreachable Redis answers False (the
        wait itself reports that).
        """
        now = time.monotonic()
        if self.run_id is None or (not force and now - self._checked_at < PROBE_EVERY_S):
            return False
        self._checked_at = now
        try:
            current = server_run_id(self.broker)
            if current is None or current == self.run_id:
                return False
            if self._present():
                # It survived this restart (persistence on): checks stay one INFO until the next restart.
                self.run_id, self._misses = current, 0
                return False
        except Exception:
            return False
        # A message between BRPOP and kombu's unacked HSET is in neither place for an instant: ask twice.
        self._misses += 1
        return self._misses >= 2

    def _present(self) -> bool:
        if self.result_exists(self.task_id):
            return True
        needle = self.task_id.encode()
        pipe = self.broker.pipeline(transaction=False)
        for name in queue_lists(self.queue):
            pipe.lrange(name, 0, -1)
        pipe.hvals(_unacked_key())
        for items in pipe.execute():
            if any(needle in (item if isinstance(item, bytes) else str(item).encode()) for item in items):
                return True
        return False

    def message(self) -> str:
        return (f"job {self.task_id} was lost: Redis lost its data (the server restarted without persistence, "
                f"its run_id changed) and the task is no longer queued, delivered or finished; submit it again")


class LossWatch:
    """A client's side of loss detection: the broker's ``run_id`` at submit, and a probe per job.

    Args:
        settings: the client's settings (the broker URL).
        app: the client's Celery app (its result backend).
    """

    def __init__(self, settings: Any, app: Any) -> None:
        self.settings = settings
        self.app = app
        self._broker: Any = None
        self._cached: tuple[float, str | None] | None = None

    def run_id(self) -> str | None:
        """The broker's ``run_id``, read at most once per :data:`PROBE_EVERY_S`.

        None when the broker is not Redis or does not answer ``INFO`` (its jobs then only time out). A value a
        second old is safe: a task sent to a newer server is found where it is, so never called lost.
        """
        if not self.settings.broker.startswith(("redis://", "rediss://", "unix://")):
            return None
        cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < PROBE_EVERY_S:
            return cached[1]
        if self._broker is None:
            from .connections import redis_client

            self._broker = redis_client(self.settings, self.settings.broker)
        try:
            run_id = server_run_id(self._broker)
        except Exception:  # INFO refused (managed Redis) or Redis away: send_task reports the latter
            run_id = None
        self._cached = (time.monotonic(), run_id)
        return run_id

    def probe(self, task_id: str, queue: str, run_id: str | None) -> LossProbe | None:
        """A probe for one sent task, or None when the ``run_id`` at submit is unknown."""
        if run_id is None:
            return None
        return LossProbe(task_id, queue, broker=self._broker, run_id=run_id, result_exists=self._result_exists)

    def _result_exists(self, task_id: str) -> bool:
        backend = self.app.backend
        client = getattr(backend, "client", None)
        if client is None or not hasattr(backend, "get_key_for_task"):
            return True  # not a Redis backend: cannot tell, so never call the task lost
        return bool(client.exists(backend.get_key_for_task(task_id)))

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()


def _unacked_key() -> str:
    from kombu.transport.redis import Channel

    return str(Channel.unacked_key)
