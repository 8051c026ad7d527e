"""The client's task-sent events: published in batches off the submit path, still seen by an event receiver."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest

from dspex_tasks.client import Client

pytestmark = pytest.mark.redis


def _publishes(client: Client) -> int:
    return int(client.redis.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))


def test_task_sent_events_arrive_in_batches_and_receivers_see_each(settings: Any) -> None:
    client = Client(settings=settings)
    try:
        client._published = {}  # noqa: SLF001 - no worker here: skip the schema lookup
        client.validate = lambda name, inputs: None  # type: ignore[method-assign]
        seen: dict[str, dict[str, Any]] = {}
        ready = threading.Event()
        conn = client.app.connection_for_read()
        recv = client.app.events.Receiver(conn, handlers={"task-sent": lambda e: seen.setdefault(e["uuid"], e)})

        def receive() -> None:
            ready.set()
            with contextlib.suppress(Exception):  # stopped by closing its connection
                recv.capture(limit=None, timeout=None, wakeup=False)

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        ready.wait(5)
        time.sleep(0.3)  # the receiver's queue is bound
        before = _publishes(client)
        jobs = [client.submit("qa", {"question": f"q{i}"}) for i in range(100)]
        after_submit = _publishes(client)
        deadline = time.monotonic() + 5
        while len(seen) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        recv.should_stop = True
        t.join(3)
        conn.close()
        # Then every task's sent event arrived, with its name, kwargs and queue, as Flower reads them
        assert set(seen) == {j.id for j in jobs}
        event = seen[jobs[0].id]
        assert event["name"] == "dspex.qa" and "q0" in event["kwargs"] and event["queue"] == settings.predict_queue
        # and the submits published far fewer event messages than tasks (a batch per 50 ms; Celery: one each)
        assert after_submit - before < len(jobs) / 2, after_submit - before
    finally:
        client.close()
