"""Celery's ``task-sent`` events from a client, published in batches by a background thread.

Celery publishes a task's ``task-sent`` event (what lets Flower list it while it waits in its queue) inline in
``send_task``: a second Redis round trip and ~45% of a submit's CPU. :class:`SentEvents` is handed to
``send_task`` as its ``event_dispatcher``: ``publish`` only queues the event, and a daemon thread sends what
has queued every :data:`FLUSH_S` as one ``task-multi`` message (Celery's own batch format, which Flower and
every ``EventReceiver`` unpack). An event may reach Flower up to that much later than its message reaches the
queue, and after the worker's ``task-received`` for a fast task; Celery's event state orders states by
precedence, so the task still ends as the worker reported it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from typing import Any

__all__ = ["SentEvents", "FLUSH_S"]

log = logging.getLogger(__name__)

#: The longest a task-sent event waits in a client before it is published (with the others queued).
FLUSH_S = 0.05


class SentEvents:
    """A ``send_task`` ``event_dispatcher`` that batches (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._queue: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._cv = threading.Condition()
        self._pid: int | None = None
        self._sent = 0
        self._taken = 0
        self._closed = False

    def publish(self, type_: str, fields: dict[str, Any], producer: Any = None, retry: bool = False,
                retry_policy: Any = None, **_: Any) -> None:
        with self._cv:
            if self._pid != os.getpid():  # first use, or a forked child: a thread of its own
                self._pid = os.getpid()
                self._closed = False
                threading.Thread(target=self._run, name="dspex-sent-events", daemon=True).start()
            self._queue.append((type_, dict(fields)))
            self._cv.notify_all()

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait until every event queued so far is published."""
        with self._cv:
            target = self._taken + len(self._queue)
            self._cv.notify_all()
            return self._cv.wait_for(lambda: self._sent >= target, timeout=timeout_s)

    def close(self) -> None:
        if self._pid is not None:
            self.flush()
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _run(self) -> None:
        dispatcher = None
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._queue) or self._closed)
                if self._closed and not self._queue:
                    break
                self._cv.wait(FLUSH_S)  # let a batch gather (flush() and close() cut it short)
                batch = list(self._queue)
                self._queue.clear()
                self._taken += len(batch)
            try:
                if dispatcher is None:
                    dispatcher = self.app.events.Dispatcher(self.app.connection_for_write(), buffer_group=["task"],
                                                            buffer_limit=1 << 30)
                for type_, fields in batch:
                    dispatcher.send(type_, **fields)
                dispatcher.flush()
            except Exception as exc:  # noqa: BLE001 - events are best effort; the tasks were sent
                log.warning("could not publish %d task-sent event(s): %s", len(batch), exc)
                dispatcher = None
            with self._cv:
                self._sent += len(batch)
                self._cv.notify_all()
        if dispatcher is not None:
            with contextlib.suppress(Exception):  # closing
                dispatcher.close()
                if dispatcher.connection is not None:
                    dispatcher.connection.close()
