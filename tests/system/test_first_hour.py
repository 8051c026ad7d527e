"""What a new user hits first, with real processes: the worker as the README starts it, a bare Celery sender,
a queue nobody consumes, and no Redis at all.

Each worker here runs on a Redis of its own (queue names are global to a broker), started from a directory
holding nothing but the user's signature module, written as DSPy's tutorials write signatures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.client import Client
from dspex_tasks.testing.redis_server import RedisServer
from tests._procs import ROOT, WorkerProcess, wait_for, worker_env

pytestmark = pytest.mark.system

USER_MODULE = '''\
from dspex_tasks import signature

qa = signature("question -> answer", name="tutorial_qa")
'''


@pytest.fixture
def private_redis() -> Iterator[str]:
    with RedisServer() as server:
        yield str(server.url)


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    home = tmp_path / "myproject"
    home.mkdir()
    (home / "tutorial_sigs.py").write_text(USER_MODULE)
    return home


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"question": f"what is item {i}", "answer": f"item {i}"} for i in range(n)]


@pytest.mark.parametrize("route", ["celery", "dspex"])
def test_default_worker_serves_every_queue_and_a_bare_celery_client(
        route: str, private_redis: str, user_dir: Path, tmp_path: Path) -> None:
    """``celery -A workers.app worker`` and ``dspex worker``, no ``-Q``, started in the user's own directory."""
    from celery import Celery

    w = WorkerProcess(private_redis, "dspex", queues=None, route=route, cwd=user_dir, log_dir=tmp_path,
                      env={"DSPEX_SIGNATURE_MODULES": "tutorial_sigs"}, name=f"first-{route}")
    client = Client(redis_url=private_redis)
    bare = Celery(broker=private_redis, backend=private_redis)  # no dspex configuration at all
    try:
        w.wait_ready(timeout_s=60)
        log = w.log()
        for queue in ("dspex.predict", "dspex.optimize", "celery"):
            assert f".> {queue} " in log, f"{queue} missing from the banner"
        assert "(db 0, DSPEX_REDIS_URL) · namespace dspex" in log  # which Redis and DB, at start
        assert ":**@" not in log  # no password: nothing to mask
        # A Celery client in another service, no queue named: served by the default worker
        res = bare.send_task("dspex.tutorial_qa", kwargs={"inputs": {"question": "hi"}}).get(timeout=30)
        assert isinstance(res["outputs"]["answer"], str) and res["program"] == "tutorial_qa"
        # An optimization (dspex.optimize) finishes: the same worker consumes that queue too
        wait_for(lambda: "tutorial_qa" in client.signatures(refresh=True), what="signatures published")
        run = client.optimize("tutorial_qa", _rows(6), session="s1", metric="exact_match",
                              params={"eval_chunk_size": 4})
        summary = run.get(timeout=90)
        assert summary["run_id"] == run.id and "baseline_score" in summary
    finally:
        bare.close()
        client.close()
        w.stop()


def _dspex(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dspex_tasks", *args], cwd=ROOT, capture_output=True, text=True,
                          env=worker_env(url, "dspex", **env), timeout=60, check=False)


def test_health_and_status_flag_a_queue_nobody_consumes(private_redis: str, tmp_path: Path) -> None:
    """A worker told ``-Q dspex.predict`` leaves optimizations waiting: health fails and status says so."""
    w = WorkerProcess(private_redis, "dspex", queues="dspex.predict", log_dir=tmp_path, name="predict-only")
    client = Client(redis_url=private_redis)
    try:
        w.wait_ready(timeout_s=60)
        healthy = _dspex(private_redis, "health", "--json", "--timeout", "2")
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        client.app.send_task("dspex.qa", kwargs={"inputs": {"question": "x"}}, queue="dspex.optimize")
        sick = _dspex(private_redis, "health", "--json", "--timeout", "2")
        assert sick.returncode == 1, sick.stdout + sick.stderr
        data = json.loads(sick.stdout)
        assert data["failed"] == ["queues"] and data["queues"]["unconsumed"] == {"dspex.optimize": 1}
        assert "dspex.optimize: 1 waiting, no worker consumes it" in sick.stderr
        status = json.loads(_dspex(private_redis, "status", "--json").stdout)
        assert status["unconsumed"] == {"dspex.optimize": 1}
        assert status["consumers"]["dspex.predict"] == [w.hostname] and status["consumers"]["dspex.optimize"] == []
        table = _dspex(private_redis, "status")
        assert "no worker consumes it" in table.stdout
    finally:
        client.close()
        w.stop()


DEAD = "redis://127.0.0.1:1/0"


def _one_line(text: str, needle: str) -> str:
    lines = [line for line in text.splitlines() if needle in line]
    assert len(lines) == 1, text
    assert "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("route", ["celery", "dspex"])
def test_worker_without_redis_exits_in_seconds(route: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    w = WorkerProcess(DEAD, "dspex", queues=None, route=route, log_dir=tmp_path, name=f"dead-{route}",
                      env={"DSPEX_REDIS_WAIT_S": "1"})
    try:
        code = w.proc.wait(30)
    finally:
        w.stop()
    assert code == 69, w.log()
    assert time.monotonic() - t0 < 30
    line = _one_line(w.log(), "cannot reach Redis")
    assert DEAD in line and "DSPEX_REDIS_URL" in line and "Connection refused" in line
    assert "maxmemory-policy" not in w.log()


def test_gateway_and_cli_without_redis_exit_in_seconds() -> None:
    t0 = time.monotonic()
    gateway = _dspex(DEAD, "gateway", "--port", "0", DSPEX_REDIS_WAIT_S="1")
    assert gateway.returncode == 69, gateway.stdout + gateway.stderr
    line = _one_line(gateway.stderr, "cannot reach Redis")
    assert DEAD in line and "DSPEX_REDIS_URL" in line
    for args in (("status",), ("signatures",), ("runs", "ls")):
        proc = _dspex(DEAD, *args)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        line = _one_line(proc.stderr, "cannot reach Redis")
        assert DEAD in line and "DSPEX_REDIS_URL" in line
    assert time.monotonic() - t0 < 30


def test_worker_names_a_signature_module_it_cannot_import(private_redis: str, tmp_path: Path) -> None:
    w = WorkerProcess(private_redis, "dspex", queues=None, route="dspex", cwd=tmp_path, log_dir=tmp_path,
                      name="nomodule", env={"DSPEX_SIGNATURE_MODULES": "not_here_sigs"})
    try:
        assert w.proc.wait(30) != 0
    finally:
        w.stop()
    line = _one_line(w.log(), "not_here_sigs")
    assert "DSPEX_SIGNATURE_MODULES" in line and "PYTHONPATH" in line and str(tmp_path) in line
