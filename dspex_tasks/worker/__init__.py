"""The worker side: the deployable app (``app``), programs as Celery tasks (``tasks``), the per-process
runtime (``runtime``) and its one module runner (``runner``), the delivery guard that dead-letters a
message that keeps killing workers (``guard``), the process group behind ``dspex worker`` (``procs``),
and the DSPy memoizations applied once per process (``dspy_patches``)."""
