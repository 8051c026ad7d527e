"""A worker SIGKILLed the instant it fetches a message loses nothing (issue 13, item 3).

kombu's Redis transport pops a message (``BRPOP``) and only then records it as unacknowledged: a kill in
between loses it. :mod:`dspex_tasks.worker.fetch` pops and records in one Lua script. Each iteration
starts a consumer process, publishes one message, and SIGKILLs the consumer when Redis reports the queue
emptied by the pop (a keyspace notification: microseconds after the pop, before the consumer can have
done anything else). A last consumer, not killed, must then process every message, restored from the
killed ones' unacknowledged records. The same harness run against kombu's own transport loses messages
(``test_the_harness_catches_kombus_window``), which shows the kill lands inside the window.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection, Producer, Queue

from dspex_tasks.testing.redis_server import RedisServer
from tests._procs import ROOT, WorkerProcess, wait_for

pytestmark = pytest.mark.system

ITERATIONS = 12  # about 60% of kills land inside kombu's window; 12 keep both tests able to fail


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        r = redis.Redis.from_url(s.url)
        r.config_set("notify-keyspace-events", "Kg")  # the generic `del` when a pop empties a list
        r.close()
        yield s


def _consumer(url: str, queue: str, transport: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fetch_consumer", url, queue, transport], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _kill_at_fetch(url: str, transport: str, iterations: int) -> tuple[set[int], int]:
    """Run the iterations; returns (ids never processed, kills that landed before the message was done)."""
    queue = f"q-{transport}"
    r = redis.Redis.from_url(url)
    db = r.connection_pool.connection_kwargs.get("db", 0)
    in_time = 0
    with Connection(url) as conn:
        producer = Producer(conn.default_channel)
        for i in range(iterations):
            proc = _consumer(url, queue, transport)
            sub = r.pubsub()
            sub.subscribe(f"__keyspace@{db}__:{queue}")
            sub.get_message(timeout=1)  # the subscribe confirmation
            producer.publish({"id": i}, routing_key=queue, declare=[Queue(queue, routing_key=queue)],
                             serializer="json")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                event = sub.get_message(timeout=1)
                if event and event["data"] == b"del":  # the pop emptied the queue: kill now
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            else:
                proc.kill()
                raise AssertionError(f"iteration {i}: the consumer never fetched")
            proc.wait(timeout=10)
            sub.close()
            in_time += not r.sismember(f"{queue}:done", i)
        survivor = _consumer(url, queue, transport)
        try:
            everything = set(range(iterations))
            done = lambda: {int(x) for x in r.smembers(f"{queue}:done")}  # noqa: E731
            with contextlib.suppress(TimeoutError):  # what is missing is reported below
                wait_for(lambda: done() >= everything, timeout_s=15, interval_s=0.2, what="every message processed")
            lost = everything - done()
        finally:
            survivor.kill()
            survivor.wait(timeout=10)
    r.close()
    return lost, in_time


def test_a_consumer_killed_at_fetch_loses_no_message(server: RedisServer) -> None:
    lost, in_time = _kill_at_fetch(server.url, "dspex", ITERATIONS)
    # some kills must land before the consumer finished its message, so the restore path is exercised
    assert in_time >= 2, f"only {in_time} of {ITERATIONS} kills landed before the message was done"
    assert not lost, f"{len(lost)} of {ITERATIONS} messages lost: {sorted(lost)}"


@pytest.mark.serial  # the kill must follow the pop within kombu's window: a parallel load made every kill late
def test_the_harness_catches_kombus_window(server: RedisServer) -> None:
    # kombu's own transport, same kills: some land between BRPOP and the unacked record, and lose the message.
    lost, _ = _kill_at_fetch(server.url, "kombu", ITERATIONS)
    assert lost, "no kill landed inside kombu's fetch window: the harness no longer proves anything"


def test_a_celery_worker_killed_at_fetch_loses_no_job(server: RedisServer, tmp_path: Path) -> None:
    """The same kill through the whole stack: ``celery -A workers.app worker``, a client, the mock LM."""
    from dspex_tasks.client import Client
    from dspex_tasks.settings import Settings

    ns, queue = "kaf", "kaf.predict"
    env = {"DSPEX_PREDICT_QUEUE": queue, "DSPEX_VISIBILITY_TIMEOUT_S": "10", "DSPEX_LM_TIMEOUT_S": "2",
           "DSPEX_LM_NUM_RETRIES": "0"}
    r = redis.Redis.from_url(server.url)
    client = Client(settings=Settings(redis_url=server.url, namespace=ns, predict_queue=queue))
    jobs = []
    try:
        for i in range(3):
            worker = WorkerProcess(server.url, ns, queues=queue, concurrency=4, name=f"kaf{i}", log_dir=tmp_path,
                                   env=env)
            worker.wait_ready(timeout_s=60)
            sub = r.pubsub()
            sub.subscribe(f"__keyspace@0__:{queue}")
            sub.get_message(timeout=1)
            jobs.append(client.submit("qa", {"question": f"killed at fetch {i}"}))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                event = sub.get_message(timeout=1)
                if event and event["data"] == b"del":
                    worker.kill_group(signal.SIGKILL)
                    break
            else:
                raise AssertionError(f"worker {i} never fetched:\n{worker.log()[-2000:]}")
            worker.stop(timeout_s=10)
            sub.close()
        survivor = WorkerProcess(server.url, ns, queues=queue, concurrency=4, name="kafsurvivor", log_dir=tmp_path,
                                 env=env)
        try:
            survivor.wait_ready(timeout_s=60)
            # restored one visibility timeout (10 s) after each kill, then served
            answers = [job.get(timeout=40) for job in jobs]
            assert all(a.outputs["answer"] for a in answers)
        finally:
            survivor.stop(timeout_s=10)
    finally:
        client.close()
        r.close()


def test_a_redelivered_finished_task_returns_its_stored_result_without_running(server: RedisServer,
                                                                              tmp_path: Path) -> None:
    """A worker killed after storing a result but before its ack: the message comes back marked redelivered
    (kombu's restore), and the next worker must not call the LM again."""
    import json

    from dspex_tasks.client import Client
    from dspex_tasks.settings import Settings
    from dspex_tasks.testing.mock_server import MockLMServer

    ns, queue = "redo", "redo.predict"
    with MockLMServer() as lm:
        env = {"DSPEX_PREDICT_QUEUE": queue, "DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": lm.url,
               "DSPEX_LM_API_KEY": "sk-test-not-real"}
        client = Client(settings=Settings(redis_url=server.url, namespace=ns, predict_queue=queue))
        r = redis.Redis.from_url(server.url)
        try:
            first = WorkerProcess(server.url, ns, queues=queue, concurrency=2, name="redo1", log_dir=tmp_path, env=env)
            first.wait_ready(timeout_s=60)
            job = client.submit("qa", {"question": "asked once"})
            answer = job.get(timeout=30).outputs
            calls = len(lm.request_log())
            first.stop(timeout_s=10)
            # the same message again, as kombu's restore puts it back: marked redelivered
            client.app.send_task("dspex.qa", kwargs={"inputs": {"question": "asked once"}}, task_id=job.id,
                                 queue=queue)
            raw = json.loads(r.rpop(queue))
            raw["headers"]["redelivered"] = True
            raw["properties"]["delivery_info"]["redelivered"] = True
            r.lpush(queue, json.dumps(raw))
            second = WorkerProcess(server.url, ns, queues=queue, concurrency=2, name="redo2", log_dir=tmp_path,
                                   env=env)
            try:
                second.wait_ready(timeout_s=60)
                wait_for(lambda: r.llen(queue) == 0 and r.hlen("unacked") == 0, timeout_s=20,
                         what="the redelivered message handled and acknowledged")
            finally:
                second.stop(timeout_s=10)
            assert len(lm.request_log()) == calls, "the finished task called the LM again"
            assert client.job(job.id).get(timeout=5).outputs == answer
        finally:
            client.close()
            r.close()


def test_a_prediction_outliving_the_visibility_timeout_runs_once(server: RedisServer, tmp_path: Path) -> None:
    """A multi-hop program making six 2.5 s LM calls (15 s) under a 10 s visibility timeout: its living worker
    keeps the message visible to nobody else, so it is not redelivered and run again beside itself."""
    from dspex_tasks.client import Client
    from dspex_tasks.settings import Settings
    from dspex_tasks.testing.mock_server import MockLMServer

    ns, queue = "lease", "lease.predict"
    with MockLMServer(latency_ms=2500) as lm:
        env = {"DSPEX_PREDICT_QUEUE": queue, "DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": lm.url,
               "DSPEX_LM_API_KEY": "sk-test-not-real", "DSPEX_VISIBILITY_TIMEOUT_S": "10",
               "DSPEX_LM_TIMEOUT_S": "5", "DSPEX_LM_NUM_RETRIES": "0"}
        client = Client(settings=Settings(redis_url=server.url, namespace=ns, predict_queue=queue))
        worker = WorkerProcess(server.url, ns, queues=queue, concurrency=4, name="lease", log_dir=tmp_path, env=env)
        try:
            worker.wait_ready(timeout_s=60)
            result = client.submit("multihop", {"claim": "The Eiffel Tower is in Paris."}).get(timeout=60)
            assert result.outputs["titles"]
            time.sleep(2)  # a second run, had there been one, would still be calling
            assert len(lm.request_log()) == 6, f"{len(lm.request_log())} LM calls for one 6-call prediction"
        finally:
            worker.stop(timeout_s=10)
            client.close()
