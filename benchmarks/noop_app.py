"""A bare Celery app with one no-op task, the baseline of ``bench_runtime.py``'s ``overhead`` scenario.

``celery -A benchmarks.noop_app worker -Q bench.noop ...`` from the repo root. Its configuration is
``dspex_tasks.app.celery_config`` (same broker and result transport, serializers, late acks, prefetch,
events), only the default queue differs, and it quiets Celery's two per-task INFO lines exactly as the
dspex worker does (``log_each_task=False``), so the two workers differ only in what the task does.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from dspex_tasks.app import celery_config
from dspex_tasks.settings import load_settings

QUEUE = "bench.noop"
TASK = "bench.noop"

settings = load_settings(redis_url=os.environ.get("DSPEX_REDIS_URL", "redis://127.0.0.1:6379/0"),
                         predict_queue=QUEUE, worker_pool="threads", worker_concurrency=16)
app = Celery("bench")
app.conf.update(celery_config(settings))


@app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, queue=QUEUE)  # type: ignore[untyped-decorator]
def noop(i: int = 0) -> dict[str, Any]:
    return {"ok": True, "i": i}


@signals.worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _quiet_task_logs(**_: Any) -> None:
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
