"""The deployable Celery app: ``celery -A workers.app worker`` from the repo root.

Everything comes from ``DSPEX_*`` settings: broker, signature modules
(``DSPEX_SIGNATURE_MODULES``, default ``signatures``), LM, pool and concurrency.
"""

from __future__ import annotations

from dspex_tasks.worker.app import create_worker_app

app = create_worker_app()
celery = app  # ``celery -A workers.app`` finds either name
