"""Redis loses its data (restarted without persistence) while workers keep running (issue 13 item 4).

Each test runs a private ``redis-server`` without persistence, so a restart empties it, and a real worker process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex_tasks import errors, keys
from dspex_tasks.client import Client
from dspex_tasks.testing.redis_server import RedisServer
from tests._procs import ROOT, WorkerProcess, wait_for, worker_env

pytestmark = pytest.mark.system

NS = "loss"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def _health(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dspex_tasks", "health", "--json", "--timeout", "2"], cwd=ROOT,
                          capture_output=True, text=True, env=worker_env(url, NS), timeout=60, check=False)


def test_workers_republish_signatures_after_redis_loses_its_data(server: RedisServer, tmp_path: Path) -> None:
    w = WorkerProcess(server.url, NS, log_dir=tmp_path, name="republisher")
    client = Client(redis_url=server.url, namespace=NS)
    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        assert client.submit("qa", {"question": "before"}).get(timeout=30).outputs
        # Given Redis restarted without persistence: the registry is gone
        server.restart()
        assert "qa" not in client.signatures(refresh=True)
        # Then, within a few seconds and without restarting the worker, the signatures are back
        t0 = time.time()
        wait_for(lambda: "qa" in client.signatures(refresh=True), timeout_s=10, interval_s=0.2,
                 what="signatures republished")
        assert time.time() - t0 < 10 and w.proc.poll() is None
        assert "republished" in w.log()
        # And a submit succeeds again
        deadline = time.time() + 30
        while True:
            try:
                assert client.submit("qa", {"question": "after"}).get(timeout=10).outputs
                break
            except (errors.BackendUnavailable, errors.TaskTimeout):
                assert time.time() < deadline, "no result after Redis came back"
        # And health fails naming the loss (queued tasks vanished with it), though the registry is back
        health = _health(server.url)
        data = json.loads(health.stdout)
        assert data["registry"]["signatures"] >= 1, health.stdout
        assert health.returncode == 1 and "registry" in data["failed"], health.stdout
        assert "Redis lost its data" in data["registry"]["error"] and "noticed by worker" in data["registry"]["error"]
        # while a --local probe (Kubernetes liveness) does not restart workers for it
        local = subprocess.run([sys.executable, "-m", "dspex_tasks", "health", "--json", "--local", "--timeout", "2"],
                               cwd=ROOT, capture_output=True, text=True, env=worker_env(server.url, NS), timeout=60,
                               check=False)
        assert json.loads(local.stdout)["registry"]["ok"], local.stdout
        # A single lost key (not a restart) comes back too, and is not called a data loss
        client.redis.delete(keys.signatures(NS), keys.data_lost(NS))
        wait_for(lambda: "qa" in client.signatures(refresh=True), timeout_s=10, interval_s=0.2,
                 what="signatures republished after the key was deleted")
        time.sleep(0.5)
        assert not client.redis.exists(keys.data_lost(NS))
        assert json.loads(_health(server.url).stdout)["registry"]["ok"]
    finally:
        client.close()
        w.stop()


def test_health_fails_naming_the_registry_when_no_signature_is_published(server: RedisServer) -> None:
    # Given a reachable Redis and no worker ever published (or Redis lost the registry)
    result = _health(server.url)
    # Then health fails and names the registry and why it may be empty
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert "registry" in data["failed"] and data["registry"]["signatures"] == 0
    assert "no signature published" in data["registry"]["error"]
    assert "lost its data" in data["registry"]["error"]
    assert "registry: no signature published" in " ".join(result.stderr.split())


def test_a_job_lost_with_redis_data_fails_clearly_and_soon(server: RedisServer, tmp_path: Path) -> None:
    w = WorkerProcess(server.url, NS, queues="dspex.predict", log_dir=tmp_path, name="loss-watcher")
    client = Client(redis_url=server.url, namespace=NS)
    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        # A job on a queue no worker consumes, without any restart, is only late: TaskTimeout, never ResultLost
        late = client.submit("qa", {"question": "late"}, queue="dspex.nobody")
        with pytest.raises(errors.TaskTimeout):
            late.get(timeout=5)
        # Given a job queued, then Redis restarted without persistence before any worker took it
        job = client.submit("qa", {"question": "lost"}, queue="dspex.nobody")
        server.restart()
        # Then get() says the job was lost with Redis's data, well before its timeout
        t0 = time.time()
        with pytest.raises(errors.ResultLost) as lost:
            job.get(timeout=20)
        assert time.time() - t0 < 12
        assert "Redis lost its data" in str(lost.value) and job.id in str(lost.value)
    finally:
        client.close()
        w.stop()


def test_map_chunks_and_job_handles_lost_with_redis_data_fail_clearly(server: RedisServer, tmp_path: Path) -> None:
    import threading

    import redis

    from dspex_tasks.settings import Settings

    w = WorkerProcess(server.url, NS, queues="dspex.predict", log_dir=tmp_path, name="loss-map")
    nobody = Client(settings=Settings(redis_url=server.url, namespace=NS, predict_queue="dspex.nobody"))
    r = redis.Redis.from_url(server.url)
    outcome: dict[str, BaseException] = {}

    def run_map() -> None:
        try:
            nobody.map("qa", [{"question": f"q{i}"} for i in range(3)], timeout=20)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            outcome["error"] = exc

    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: "qa" in nobody.signatures(refresh=True), what="signatures published")
        # Given a job known only by its id, and a map waiting on chunks no worker takes
        handle = nobody.job(nobody.submit("qa", {"question": "by id"}).id, queue="dspex.nobody")
        mapping = threading.Thread(target=run_map)
        mapping.start()
        wait_for(lambda: r.llen("dspex.nobody") >= 2, what="the map's chunk queued")
        # When Redis restarts without persistence
        server.restart()
        t0 = time.time()
        # Then both say the work was lost with Redis's data, well before their timeouts
        with pytest.raises(errors.ResultLost):
            handle.get(timeout=20)
        mapping.join(timeout=25)
        assert isinstance(outcome.get("error"), errors.ResultLost), outcome
        assert time.time() - t0 < 15
    finally:
        r.close()
        nobody.close()
        w.stop()
