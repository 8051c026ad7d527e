"""Optimization as chained, checkpointed Celery jobs (see ``stages``), with the client handle in ``runs``."""
