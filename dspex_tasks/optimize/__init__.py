"""Optimization runs as chained, checkpointed Celery jobs: the stages (``stages``), run records, events and
the client handle (``runs``), datasets (``datasets``), metrics by name (``metrics``), optimizers by name
(``optimizers/``), schedules with RedBeat (``schedules``), and charts of a run (``plots``)."""
