"""Scheduled re-optimizations with celery beat and RedBeat.

Schedule entries live in Redis (RedBeat, JSON encoded) under the namespace, and
RedBeat's lock keeps one active beat however many are started. A due entry
sends ``dspex.optimize.scheduled``, which starts a run exactly as
``Client.optimize`` does: same stages, same gate.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from .. import keys
from ..errors import ValidationError
from ..wire import SCHEDULED_TASK

__all__ = ["beat_config", "add_schedule", "list_schedules", "remove_schedule", "SCHEDULED_TASK"]



def beat_config(settings: Any) -> dict[str, Any]:
    """Celery settings for beat with RedBeat (merged into the app's conf)."""
    return {
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "redbeat_redis_url": settings.redis_url,
        "redbeat_redis_options": {},
        "redbeat_key_prefix": keys.redbeat_prefix(settings.namespace),
        "redbeat_lock_timeout": 30,
        "beat_max_loop_interval": 5,
    }


def _schedule(cron: str | None, every_s: float | None) -> Any:
    from celery.schedules import crontab, schedule

    if (cron is None) == (every_s is None):
        raise ValidationError.from_errors("schedule", [{"field": "cron", "message": "give exactly one of cron or every"}])
    if every_s is not None:
        if every_s < 1:
            raise ValidationError.from_errors("schedule", [{"field": "every", "message": "at least 1 second"}])
        return schedule(run_every=timedelta(seconds=every_s))
    parts = str(cron).split()
    if len(parts) != 5:
        raise ValidationError.from_errors("schedule", [{
            "field": "cron", "message": f"expected 5 fields 'minute hour day month weekday', got {cron!r}"}])
    try:
        return crontab(*parts)
    except Exception as exc:  # celery's parser errors
        raise ValidationError.from_errors("schedule", [{"field": "cron", "message": str(exc)}]) from None


def add_schedule(app: Any, name: str, *, signature: str, dataset: str, metric: str, optimizer: str,
                 session: str, program: str | None = None, params: dict[str, Any] | None = None,
                 cron: str | None = None, every_s: float | None = None) -> dict[str, Any]:
    """Create or replace the schedule ``name``; returns its description."""
    from redbeat import RedBeatSchedulerEntry

    keys.check_id(name, "schedule")
    keys.check_id(session, "session")
    keys.check_id(dataset, "dataset")
    kwargs = {"signature": signature, "dataset": dataset, "metric": metric, "optimizer": optimizer,
              "session": session, "program": program or signature, "params": params or {}, "schedule": name}
    entry = RedBeatSchedulerEntry(name, SCHEDULED_TASK, _schedule(cron, every_s), kwargs=kwargs,
                                  options={"queue": app.dspex_settings.optimize_queue}, app=app)
    entry.save()
    return describe(entry)


def describe(entry: Any) -> dict[str, Any]:
    return {"name": entry.name, "task": entry.task, "schedule": str(entry.schedule), "kwargs": entry.kwargs,
            "enabled": entry.enabled, "last_run_at": entry.last_run_at.isoformat() if entry.last_run_at else None,
            "due_at": entry.due_at.isoformat() if entry.due_at else None}


def list_schedules(app: Any) -> list[dict[str, Any]]:
    from redbeat import RedBeatSchedulerEntry
    from redbeat.schedulers import ensure_conf, get_redis

    ensure_conf(app)
    redis = get_redis(app)
    out = []
    for key in redis.zrange(app.redbeat_conf.schedule_key, 0, -1):
        try:
            entry = RedBeatSchedulerEntry.from_key(key.decode() if isinstance(key, bytes) else key, app=app)
        except KeyError:
            continue
        if entry.task == SCHEDULED_TASK:
            out.append(describe(entry))
    return out


def remove_schedule(app: Any, name: str) -> bool:
    from redbeat import RedBeatSchedulerEntry
    from redbeat.schedulers import ensure_conf

    keys.check_id(name, "schedule")
    ensure_conf(app)
    key = RedBeatSchedulerEntry.generate_key(app, name)
    try:
        RedBeatSchedulerEntry.from_key(key, app=app).delete()
    except KeyError:
        return False
    return True


def register_scheduled_task(app: Any) -> Any:
    """The task a due schedule sends: start a run on the named dataset (gated like any run)."""
    from .runs import RunStore, start_run

    def scheduled(self: Any, *, signature: str, dataset: str, metric: str, optimizer: str, session: str,
                  program: str, params: dict[str, Any], schedule: str = "") -> dict[str, Any]:
        runs = RunStore(redis=self.app.runtime.redis, namespace=self.app.dspex_settings.namespace)
        spec = {"signature": signature, "session": session, "program": program, "metric": metric,
                "optimizer": optimizer, "params": params, "dataset": dataset, "scheduled": True,
                "schedule": schedule}
        run_id = start_run(self.app, runs, spec, queue=self.app.dspex_settings.optimize_queue)
        return {"run_id": run_id, "schedule": schedule}

    return app.task(name=SCHEDULED_TASK, bind=True, shared=False, typing=False, acks_late=True,
                    queue=app.dspex_settings.optimize_queue)(scheduled)
