"""The deployable Celery app: ``celery -A workers.app worker`` from the repo root.

The app itself is :mod:`dspex_tasks.worker.celery_app` (``celery -A dspex_tasks.worker.celery_app worker`` wherever the
package is installed); this shim keeps the checkout's command. Everything comes from ``DSPEX_*`` settings:
broker, signature modules (``DSPEX_SIGNATURE_MODULES``, default ``signatures,signatures.programs``), LM, pool
and concurrency. A worker started without ``-Q`` consumes every dspex queue (predictions, optimizations) and
Celery's default queue, where a Celery client with no dspex configuration sends.
"""

from __future__ import annotations

from dspex_tasks.worker.celery_app import app, celery

__all__ = ["app", "celery"]
