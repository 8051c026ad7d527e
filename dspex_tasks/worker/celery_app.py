"""The deployable Celery app, importable wherever the package is installed:
``celery -A dspex_tasks.worker.celery_app worker`` (``workers/app.py`` at a checkout's root is the same app).

Everything comes from ``DSPEX_*`` settings: broker, signature modules (``DSPEX_SIGNATURE_MODULES``, default
``signatures,signatures.programs``, found in the current directory as ``celery -A`` finds its app), LM, pool
and concurrency. A worker started without ``-Q`` consumes every dspex queue (predictions, optimizations) and
Celery's default queue, where a Celery client with no dspex configuration sends. The reference programs ship
as ``dspex_tasks.examples`` (``DSPEX_SIGNATURE_MODULES=dspex_tasks.examples,dspex_tasks.examples.programs``),
never imported unless named.
"""

from __future__ import annotations

from ..errors import ConfigurationError
from .app import create_worker_app

try:
    app = create_worker_app()
except ConfigurationError as exc:  # one line, not Celery's "Unable to load celery application" traceback
    raise SystemExit(f"dspex: {exc}") from None
celery = app  # ``celery -A dspex_tasks.worker.celery_app`` finds either name
