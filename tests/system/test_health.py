"""``dspex health``: exit 0 with a worker answering, 1 without one or without Redis, 2 on bad usage."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks.testing.redis_server import RedisServer
from tests._procs import ROOT, WorkerProcess, worker_env
from tests.system._cli import CliTarget, Dspex

pytestmark = pytest.mark.system


def _health_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


@pytest.fixture(scope="module")
def empty_redis() -> Iterator[str]:
    """A Redis of its own that no worker listens on (worker pings are broadcast to every worker of a broker)."""
    with RedisServer() as server:
        yield str(server.url)


def _dspex_at(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dspex_tasks", *args], cwd=ROOT,
                          env=worker_env(url, "health", COLUMNS="200"), capture_output=True, text=True, timeout=60,
                          check=False)


def test_healthy_with_a_worker(cli_worker: WorkerProcess, dspex: Dspex) -> None:
    t0 = time.monotonic()
    proc = dspex("health", "--json", "--timeout", "10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = _health_json(proc)
    assert data["healthy"] is True and data["failed"] == []
    assert data["broker"]["ok"] and data["broker"]["latency_ms"] is not None
    assert data["workers"]["counted"] == [cli_worker.hostname]
    assert time.monotonic() - t0 < 9  # the first pong ends the wait, not the timeout
    # The table form says the same
    table = dspex("health", "--timeout", "10")
    assert table.returncode == 0, table.stderr
    assert "broker" in table.stdout and cli_worker.hostname in table.stdout and "FAIL" not in table.stdout


def test_local_counts_only_workers_of_this_host(cli_worker: WorkerProcess, cli_target: CliTarget,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from dspex_tasks.cli import ops as cli_ops
    from dspex_tasks.settings import Settings

    settings = Settings(redis_url=cli_target.redis_url, namespace=cli_target.namespace,
                        predict_queue=cli_target.queue)
    # The test worker's node name is "<name>@test": pretend to be, then not to be, host "test".
    monkeypatch.setattr(cli_ops.socket, "gethostname", lambda: "test")
    here = cli_ops.collect_health(settings, timeout_s=1, local=True)
    assert here["healthy"] and cli_worker.hostname in here["workers"]["counted"]
    monkeypatch.setattr(cli_ops.socket, "gethostname", lambda: "elsewhere.example.com")
    there = cli_ops.collect_health(settings, timeout_s=0.5, local=True)
    assert not there["healthy"] and there["failed"] == ["workers"]
    assert "on this host (elsewhere.example.com)" in there["workers"]["error"]
    assert cli_worker.hostname in there["workers"]["error"]  # says which workers did answer


def test_unhealthy_without_a_worker(empty_redis: str) -> None:
    proc = _dspex_at(empty_redis, "health", "--timeout", "0.5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unhealthy" in proc.stderr and "workers: no worker answered a ping" in proc.stderr
    assert "broker" not in proc.stderr.split("unhealthy", 1)[1]  # Redis itself is fine


def test_unhealthy_without_redis() -> None:
    proc = _dspex_at("redis://127.0.0.1:1/0", "--redis-url", "redis://127.0.0.1:1/0", "health", "--json",
                     "--timeout", "0.5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = _health_json(proc)
    assert data["failed"] == ["broker"] and "Connection refused" in data["broker"]["error"]
    assert data["workers"]["skipped"] and data["queues"]["skipped"]
    assert "unhealthy (broker:" in proc.stderr


def test_queue_age_from_a_send_time_header(empty_redis: str) -> None:
    """Celery stamps no send time; a ``dspex_sent_at`` header gives the age, and a plain message passes."""
    import redis

    from dspex_tasks.app import create_app
    from dspex_tasks.settings import Settings

    r = redis.Redis.from_url(empty_redis)
    r.flushdb()
    app = create_app(Settings(redis_url=empty_redis, namespace="health"))
    try:
        app.send_task("dspex.qa", kwargs={"inputs": {"question": "old"}, "session": None, "program": None},
                      queue="dspex.predict", headers={"dspex_sent_at": time.time() - 1000})
        app.send_task("dspex.qa", kwargs={"inputs": {"question": "plain"}, "session": None, "program": None},
                      queue="dspex.optimize")
        data = _health_json(_dspex_at(empty_redis, "health", "--json", "--timeout", "0.3",
                                      "--max-queue-age-s", "300"))
        predict, optimize = data["queues"]["queues"]["dspex.predict"], data["queues"]["queues"]["dspex.optimize"]
        assert predict["depth"] == 1 and predict["oldest_age_s"] >= 1000 and not predict["ok"]
        assert predict["age_source"] == "headers.dspex_sent_at"
        assert optimize == {"depth": 1, "oldest_age_s": None, "age_source": None, "ok": True}
        assert set(data["failed"]) == {"workers", "queues", "registry"}  # no worker ever published here
        assert "dspex.predict" in data["queues"]["error"]
        # A looser bound passes the queue check
        loose = _health_json(_dspex_at(empty_redis, "health", "--json", "--timeout", "0.3",
                                       "--max-queue-age-s", "5000"))
        assert loose["queues"]["ok"] and loose["failed"] == ["workers", "registry"]
    finally:
        app.close()
        r.flushdb()
        r.close()


@pytest.mark.parametrize("args", [["--timeout", "0"], ["--max-queue-age-s", "-1"], ["--bogus"]])
def test_bad_usage_exits_2(args: list[str]) -> None:
    proc = _dspex_at("redis://127.0.0.1:1/0", "health", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
