"""The deployable Celery app: ``celery -A workers.app worker`` from the repo root.

Everything comes from ``DSPEX_*`` settings: broker, signature modules
(``DSPEX_SIGNATURE_MODULES``, default ``signatures``), LM, pool and concurrency.
A worker started without ``-Q`` consumes every dspex queue (predictions, optimizations) and Celery's
default queue, where a Celery client with no dspex configuration sends.
"""

from __future__ import annotations

from dspex_tasks.errors import ConfigurationError
from dspex_tasks.worker.app import create_worker_app

try:
    app = create_worker_app()
except ConfigurationError as exc:  # one line, not Celery's "Unable to load celery application" traceback
    raise SystemExit(f"dspex: {exc}") from None
celery = app  # ``celery -A workers.app`` finds either name
