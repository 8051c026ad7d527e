"""A minimal kombu consumer on the real event loop, for the kill-at-fetch test (``test_kill_at_fetch.py``).

``python -m tests.fetch_consumer URL QUEUE TRANSPORT``: consumes QUEUE through TRANSPORT (``dspex``:
:mod:`dspex_tasks.worker.fetch`, ``kombu``: kombu's own Redis transport, to show the window it leaves),
adds each message's ``id`` to the set ``QUEUE:done`` and acknowledges it, until killed. It prints
``ready`` once it consumes. No Celery and no DSPy, so a process starts in a fraction of a second and the
test can kill many of them.
"""

from __future__ import annotations

import sys
from typing import Any

from kombu import Connection, Consumer, Queue
from kombu.asynchronous import Hub

TRANSPORTS = {"dspex": "dspex_tasks.worker.fetch:Transport", "kombu": "redis"}
#: Short, so the test's recovering consumer restores a killed one's message within seconds.
OPTIONS = {"visibility_timeout": 2, "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
           "unacked_mutex_expire": 5}


def main(url: str, queue: str, transport: str) -> None:
    hub = Hub()
    conn = Connection(url, transport=TRANSPORTS[transport], transport_options=OPTIONS)
    conn.ensure_connection(max_retries=3)
    done = conn.default_channel.client

    def on_message(body: Any, message: Any) -> None:
        done.sadd(f"{queue}:done", body["id"])
        message.ack()

    conn.register_with_event_loop(hub)
    with Consumer(conn, [Queue(queue, routing_key=queue)], callbacks=[on_message], accept=["json"],
                  prefetch_count=1):
        print("ready", flush=True)
        hub.run_forever()


if __name__ == "__main__":
    main(*sys.argv[1:4])
