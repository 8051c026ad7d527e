"""A full Redis (``maxmemory`` reached, policy ``noeviction``) while a real worker runs (issue 13, item 7).

Each test runs a private ``redis-server --maxmemory 8mb --maxmemory-policy noeviction`` without persistence, a
real worker process and the HTTP mock LM; Redis is filled with one filler key until it refuses every write.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import OutOfMemoryError

from dspex_tasks import errors
from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.testing.redis_server import RedisServer
from tests._procs import ROOT, WorkerProcess, wait_for, worker_env

pytestmark = pytest.mark.system

NS = "full"
QUEUE = "dspex.predict"
PARKED = "dspex.parked"  # a queue nobody consumes
MAXMEMORY = 8 * 1024 * 1024
FULL_LINE = "is full (used memory > 'maxmemory'"
# Redis refuses LPUSH when full, but lets a script whose first write frees memory (RPOP) go on: this moves a
# parked message into the worker's queue on a full Redis, as a client could not.
MOVE = "local m = redis.call('RPOP', KEYS[1]) if m then redis.call('LPUSH', KEYS[2], m) end return m and 1 or 0"


class WorkerDied(AssertionError):
    """The worker process exited while Redis was full."""


def fill(r: redis.Redis) -> None:
    """One filler key taking Redis 1 MB past its maxmemory: every write is refused from here on."""
    r.config_set("maxmemory", 0)
    used = int(r.info("memory")["used_memory"])
    r.setrange("filler", max(1, MAXMEMORY + 1024 * 1024 - used), b"x")
    r.config_set("maxmemory", MAXMEMORY)
    with pytest.raises(OutOfMemoryError):
        r.set("probe", "x")


def free(r: redis.Redis) -> None:
    r.delete("filler")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--maxmemory", "8mb"]) as s:
        yield s


@pytest.fixture
def lm() -> Iterator[MockLMServer]:
    with MockLMServer(port=0, latency_ms=1500) as s:
        yield s


def _worker(server: RedisServer, lm: MockLMServer, tmp_path: Path, name: str, wait_s: float) -> WorkerProcess:
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": lm.url, "DSPEX_LM_API_KEY": "sk-mock",
           "DSPEX_LM_NUM_RETRIES": "0", "DSPEX_TASK_MAX_RETRIES": "0", "DSPEX_STORE_FULL_WAIT_S": str(wait_s)}
    return WorkerProcess(server.url, NS, queues=QUEUE, concurrency=8, log_dir=tmp_path, env=env, name=name)


def _alive(w: WorkerProcess) -> None:
    if w.proc.poll() is not None or "Unrecoverable error" in w.log():  # the latter: a worker on its way out
        raise WorkerDied(f"worker exited ({w.proc.returncode}):\n{w.log()[-3000:]}")


def _stored_raw_redis_error(r: redis.Redis) -> list[str]:
    return [k.decode() for k in r.scan_iter("celery-task-meta-*") if b"OutOfMemoryError" in (r.get(k) or b"")]


def test_a_full_redis_pauses_the_worker_refuses_clients_typed_and_loses_nothing(
        server: RedisServer, lm: MockLMServer, tmp_path: Path) -> None:
    r = redis.Redis.from_url(server.url)
    w = _worker(server, lm, tmp_path, "full-pause", wait_s=60)
    client = Client(redis_url=server.url, namespace=NS)
    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: "qa" in client.signatures(refresh=True), timeout_s=30, what="signatures published")
        done = client.submit("qa", {"question": "before"})
        assert done.get(timeout=30).outputs["answer"]
        parked = [client.submit("qa", {"question": f"parked {i}"}, queue=PARKED) for i in range(2)]
        running = [client.submit("qa", {"question": f"running {i}"}) for i in range(2)]
        wait_for(lambda: lm.stats()["in_flight"] == 2, timeout_s=10, what="two LM calls in flight")
        # Given Redis fills up while two predictions are calling the LM
        fill(r)
        # Then a client is refused before anything is enqueued, with a typed error naming maxmemory
        with pytest.raises(errors.StoreFull, match="maxmemory"):
            client.submit("qa", {"question": "refused"})
        with pytest.raises(errors.StoreFull, match="maxmemory"):
            client.optimize("qa", [{"question": f"t{i}", "answer": "a"} for i in range(4)], session="s1")
        cli = subprocess.run([sys.executable, "-m", "dspex_tasks", "submit", "qa", "-i", "question=cli",
                              "--no-wait"], cwd=ROOT, env=worker_env(server.url, NS), capture_output=True,
                             text=True, timeout=60, check=False)
        assert cli.returncode == 1, cli.stdout + cli.stderr
        lines = [line for line in cli.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "StoreFull" in lines[0] and "maxmemory" in lines[0], cli.stderr
        # And a finished job still reads
        assert done.get(timeout=5).outputs["answer"]
        # And the worker, its two results refused, says so once and stops taking messages
        wait_for(lambda: FULL_LINE in w.log() and "Canceling queue dspex.predict" in w.log(), timeout_s=15,
                 what="the worker's store-full warning and pause")
        for _ in parked:  # two messages appear in its queue (and it has six free threads)
            assert r.eval(MOVE, 2, PARKED, QUEUE) == 1
        time.sleep(3)
        _alive(w)
        assert r.llen(QUEUE) == 2, "a paused worker took a message"
        assert lm.stats()["requests"] == 3  # no LM call for a result that could not be stored
        assert [j.state for j in running] == ["PENDING", "PENDING"]
        assert _stored_raw_redis_error(r) == []
        # When memory is freed
        free(r)
        # Then the waiting results are stored, the worker takes messages again and runs the other two
        results = [j.get(timeout=30) for j in running + parked]
        assert all(res.outputs["answer"] and res.lm == "openai/mock" for res in results)
        _alive(w)
        assert lm.stats()["requests"] == 5  # each prediction ran once: nothing lost, nothing twice
        wait_for(lambda: r.llen(QUEUE) == 0 and r.hlen("unacked") == 0, timeout_s=10, what="queue and acks drained")
        log = w.log()
        assert log.count(FULL_LINE) == 1, log[-3000:]
        assert "takes messages again" in log and "Started consuming from dspex.predict" in log
        assert log.index(FULL_LINE) < log.index("takes messages again")
        assert _stored_raw_redis_error(r) == []
    finally:
        client.close()
        w.stop()
        r.close()


def test_a_task_whose_wait_runs_out_is_requeued_and_runs_again(
        server: RedisServer, lm: MockLMServer, tmp_path: Path) -> None:
    r = redis.Redis.from_url(server.url)
    w = _worker(server, lm, tmp_path, "full-giveup", wait_s=2)
    client = Client(redis_url=server.url, namespace=NS)
    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: "qa" in client.signatures(refresh=True), timeout_s=30, what="signatures published")
        job = client.submit("qa", {"question": "outlasts the wait"})
        wait_for(lambda: lm.stats()["in_flight"] == 1, timeout_s=10, what="the LM call in flight")
        # Given Redis stays full longer than DSPEX_STORE_FULL_WAIT_S (2 s)
        fill(r)
        wait_for(lambda: "StoreFullRequeued" in w.log() or w.proc.poll() is not None, timeout_s=15,
                 what="the task giving up")
        time.sleep(1)
        # Then the task fails typed without storing anything, and its message goes back to the queue
        _alive(w)
        assert "Redis stayed full for 2 s" in w.log()
        assert r.llen(QUEUE) == 1 and r.hlen("unacked") == 0
        assert job.state == "PENDING" and _stored_raw_redis_error(r) == []
        # When memory is freed, it runs again and its result is the prediction
        free(r)
        assert job.get(timeout=30).outputs["answer"]
        assert lm.stats()["requests"] == 2
        _alive(w)
        stored = json.loads(r.get(f"celery-task-meta-{job.id}") or b"{}")
        assert stored.get("status") == "SUCCESS"
    finally:
        client.close()
        w.stop()
        r.close()
