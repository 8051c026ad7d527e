"""What operators see: Prometheus metrics from Celery signals (``prometheus``), OpenTelemetry tracing
(``tracing``), and the status model behind ``dspex status`` and ``dspex health`` (``status``)."""
