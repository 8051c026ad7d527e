"""The base class of every dspex task: a guard against messages that kill their worker.

With late acks and ``reject_on_worker_lost``, a message whose processing kills the
worker (a native crash, the OOM killer) goes back to the queue and would kill the
next worker too, forever. Kombu marks such a message ``redelivered``; only then do we
count its deliveries in Redis (the first delivery costs nothing), and past
``DSPEX_MAX_DELIVERIES`` the message is set aside in a dead-letter list and fails as
``errors.DeadLettered`` without running. A redelivered message whose task already succeeded (its
worker died between storing the result and the ack) returns the stored result without running again.
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery import Task

from .. import keys
from ..errors import DeadLettered

__all__ = ["DspexTask", "dead_letter", "dead_letters"]


def _redelivered(request: Any) -> bool:
    info = getattr(request, "delivery_info", None) or {}
    return bool(info.get("redelivered") or (getattr(request, "headers", None) or {}).get("redelivered"))


class DspexTask(Task):  # type: ignore[misc]
    """Counts redeliveries and dead-letters a message that keeps killing its worker.

    Its ``Strategy`` refuses (and dead-letters) a message that does not fit Celery's protocol before a
    request is built from it (:mod:`dspex_tasks.worker.intake`).
    """

    Strategy = "dspex_tasks.worker.intake:strategy"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _redelivered(self.request):
            finished = self._finished_result()
            if finished is not None:  # its worker died after storing the result, before the ack
                return finished[0]
            self._count_delivery(kwargs)
        return super().__call__(*args, **kwargs)

    def _finished_result(self) -> tuple[Any] | None:
        """The stored result of this task id when it already succeeded (a redelivery then changes nothing)."""
        try:
            meta = self.backend.get_task_meta(self.request.id)
        except Exception:  # noqa: BLE001 - no verdict: run it, as at-least-once delivery allows
            return None
        return (meta.get("result"),) if meta.get("status") == "SUCCESS" else None

    def _count_delivery(self, kwargs: dict[str, Any]) -> None:
        settings = self.app.dspex_settings
        redis = self.app.runtime.redis
        if redis is None:
            return
        key = keys.deliveries(settings.namespace, self.request.id)
        pipe = redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 86_400)
        count = int(pipe.execute()[0]) + 1  # the first delivery was not counted
        if count > settings.max_deliveries:
            record = {"task_id": self.request.id, "task": self.name, "deliveries": count, "at": time.time(),
                      "kwargs": {k: kwargs[k] for k in ("session", "program", "run_id", "stage", "signature")
                                 if k in kwargs}}
            dead_letter(redis, settings.namespace, record)
            raise DeadLettered(f"task {self.name}[{self.request.id}] was delivered {count} times (its worker died "
                               f"each time); set aside after DSPEX_MAX_DELIVERIES={settings.max_deliveries}")


def dead_letter(redis: Any, namespace: str, record: dict[str, Any]) -> None:
    """Set a message aside: ``record`` (``task_id``, ``task``, a ``reason`` or ``deliveries``) heads the list."""
    key = keys.dead_letters(namespace)
    pipe = redis.pipeline()
    pipe.lpush(key, json.dumps({**record, "at": time.time()}))
    pipe.ltrim(key, 0, 9999)
    pipe.execute()


def dead_letters(redis: Any, namespace: str, limit: int = 100) -> list[dict[str, Any]]:
    """The most recent dead-lettered messages."""
    return [json.loads(r.decode("utf-8", "replace") if isinstance(r, bytes) else r)
            for r in redis.lrange(keys.dead_letters(namespace), 0, limit - 1)]
