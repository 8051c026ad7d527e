"""The plugin's in-process worker runs countdown (ETA) tasks even after a worker object was built and never
started in the same process, which leaves kombu's process-wide hub, with that worker's timer, behind."""

from __future__ import annotations

from typing import Any

import pytest

from dspex_tasks.app import create_app
from dspex_tasks.client import Client
from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.testing.plugin import in_process_worker
from dspex_tasks.worker.app import create_worker_app

pytestmark = pytest.mark.redis


def test_a_countdown_task_runs_after_an_unstarted_worker_left_its_hub(settings: Any) -> None:
    from kombu.asynchronous import get_event_loop

    # Given a worker object built and never started (as `celery worker --help`-like code or a banner test does)
    stale = create_app(settings)
    stale.Worker(hostname="stale@h", without_mingle=True, without_gossip=True)
    assert get_event_loop() is not None  # it left its hub behind
    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str", name="qa", register=False))
    app = create_worker_app(settings, signatures=reg, import_modules=False)
    # When the plugin's worker runs a task queued with a countdown
    with in_process_worker(app, concurrency=2):
        client = Client(settings=settings)
        try:
            result = client.submit("qa", {"question": "later"}, countdown=0.5).get(timeout=15)
        finally:
            client.close()
    # Then it ran, and no hub is left for the next worker
    assert result.outputs["answer"]
    assert get_event_loop() is None
    stale.close()
