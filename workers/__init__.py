"""The deployable Celery app and beat schedule."""
