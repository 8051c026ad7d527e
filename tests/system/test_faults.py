"""Layer 3 fault matrix (docs/reliability.md): real processes, real Redis, faults injected for real."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from dspex_tasks import errors
from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.testing.mockgen import rule_answer
from dspex_tasks.testing.redis_server import RedisServer
from tests._procs import ROOT, WorkerProcess, wait_for

pytestmark = pytest.mark.system

POISON_ENV = {"DSPEX_SIGNATURE_MODULES": "signatures,tests.poison", "DSPEX_MOCK_SCENARIO": "crash_on_poison"}


def ready(client: Client, name: str = "qa") -> None:
    wait_for(lambda: name in client.signatures(refresh=True), what="signatures published")


# -- row 1: pool child killed mid-task ----------------------------------------------------------
def test_killed_pool_child_reruns_and_poison_message_is_dead_lettered(client: Client, redis_url: str,
                                                                      namespace: str, tmp_path: Path) -> None:
    env = {**POISON_ENV, "DSPEX_WORKER_POOL": "prefork", "DSPEX_WORKER_CONCURRENCY": "2",
           "DSPEX_MAX_DELIVERIES": "3"}
    w = WorkerProcess(redis_url, namespace, pool="prefork", concurrency=2, log_dir=tmp_path, env=env, name="pref")
    try:
        w.wait_ready()
        ready(client)
        marker = tmp_path / "died-once"
        # Given a task whose pool child is SIGKILLed the first time it runs
        once = client.submit("qa", {"question": f"ONCE:{marker}"}, session="f1")
        # Then it runs again on a fresh child and succeeds, once
        res = once.get(timeout=60)
        assert marker.exists() and res.outputs["answer"]
        # Given a message that kills its child every time, then it is set aside after N deliveries
        poison = client.submit("qa", {"question": "POISON pill"}, session="f1")
        with pytest.raises(errors.DeadLettered, match="delivered 4 times"):
            poison.get(timeout=90)
        from dspex_tasks.worker.guard import dead_letters

        letters = dead_letters(client.redis, namespace)
        assert [d["task_id"] for d in letters] == [poison.id]
        # and the worker keeps serving
        assert client.submit("qa", {"question": "healthy"}).get(timeout=30).outputs["answer"]
    finally:
        w.stop()


# -- row 7: unsafe eviction policy ------------------------------------------------------------------
def test_worker_refuses_redis_that_may_evict(tmp_path: Path) -> None:
    with RedisServer(maxmemory_policy="allkeys-lru") as server:
        w = WorkerProcess(server.url, "evict", log_dir=tmp_path, name="evict")
        try:
            assert w.proc.wait(30) == 78
            assert "maxmemory-policy is 'allkeys-lru'" in w.log()
        finally:
            w.stop()
        allowed = WorkerProcess(server.url, "evict", log_dir=tmp_path, name="evict-ok",
                                env={"DSPEX_ALLOW_UNSAFE_EVICTION": "1"})
        try:
            allowed.wait_ready()
            assert "may evict" in allowed.log()
        finally:
            allowed.stop()


# -- row 8: a chord step fails -------------------------------------------------------------------------
def test_failing_evaluation_chunk_fails_the_run_once(client: Client, redis_url: str, namespace: str,
                                                     tmp_path: Path) -> None:
    env = {**POISON_ENV, "DSPEX_MOCK_SCENARIO": "learns_from_demos"}
    w = WorkerProcess(redis_url, namespace, queues="dspex.predict,dspex.optimize", log_dir=tmp_path, env=env,
                      name="chord")
    try:
        w.wait_ready()
        ready(client)
        client.programs.put("f8", "qa", {"demos": []}, signature="qa")
        rows = [{"question": f"q{i}", "answer": rule_answer({"question": f"q{i}"})} for i in range(12)]
        valset = [{"question": "BOOM here", "answer": "x"}] + rows[:5]
        run = client.optimize("qa", rows, valset, metric="explodes", session="f8", params={"eval_chunk_size": 2})
        t0 = time.time()
        with pytest.raises(errors.DspexError, match="metric exploded"):
            run.get(timeout=60)
        assert time.time() - t0 < 30
        events = list(run.events(timeout=5))
        assert [e["stage"] for e in events].count("failed") == 1
        assert client.programs.history("f8", "qa") == [1]
    finally:
        w.stop()


# -- rows 5 and 6: Redis restarted, Redis paused ----------------------------------------------------------
def test_redis_restart_and_pause(tmp_path: Path) -> None:
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    ns = "restart"
    w = WorkerProcess(server.url, ns, log_dir=tmp_path, name="survivor")
    c = Client(redis_url=server.url, namespace=ns)
    try:
        w.wait_ready()
        ready(c)
        assert c.submit("qa", {"question": "before"}).get(timeout=30).outputs
        # When Redis restarts (idle), then the worker reconnects and serves again
        server.restart()
        deadline = time.time() + 40
        while True:
            try:
                assert c.submit("qa", {"question": "after restart"}).get(timeout=10).outputs
                break
            except (errors.DspexError, redis_lib.RedisError, OSError):
                assert time.time() < deadline, "worker did not resume after a Redis restart"
                time.sleep(1)
        # When Redis stops while a client waits, get() ends with a clear error, not a hang
        job = c.submit("qa", {"question": "in flight"})
        server.pause()
        t0 = time.time()
        threw: BaseException | None = None
        try:
            job.get(timeout=5)
        except BaseException as exc:  # noqa: BLE001 - the kind is what we check
            threw = exc
        # bound: the get timeout plus a socket timeout (DSPEX_REDIS_SOCKET_TIMEOUT_S, 10 s) and a margin
        assert time.time() - t0 < 25
        server.resume()
        assert threw is None or isinstance(threw, errors.BackendUnavailable), repr(threw)
        # When Redis is paused for a while under load, then nothing deadlocks and the tasks finish
        jobs = [c.submit("qa", {"question": f"paused {i}"}) for i in range(20)]
        server.pause()
        time.sleep(8)
        server.resume()
        assert all(j.get(timeout=60).outputs for j in jobs)
    finally:
        c.close()
        w.stop()
        server.stop()


# -- security: JSON only ------------------------------------------------------------------------------------
class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def test_pickled_message_is_refused_and_runs_nothing(client: Client, redis_url: str, namespace: str,
                                                     tmp_path: Path) -> None:
    w = WorkerProcess(redis_url, namespace, log_dir=tmp_path, name="json-only")
    canary = tmp_path / f"canary-{uuid.uuid4().hex}"
    try:
        w.wait_ready()
        ready(client)
        body = base64.b64encode(pickle.dumps(((), {"inputs": _Canary(str(canary))}, {}))).decode()
        tid = str(uuid.uuid4())
        message = {
            "body": body, "content-encoding": "binary", "content-type": "application/x-python-serialize",
            "headers": {"lang": "py", "task": "dspex.qa", "id": tid, "root_id": tid, "parent_id": None,
                        "group": None, "retries": 0, "eta": None, "expires": None, "argsrepr": "()",
                        "kwargsrepr": "{}", "origin": "attacker"},
            "properties": {"correlation_id": tid, "reply_to": "", "delivery_mode": 2, "body_encoding": "base64",
                           "delivery_tag": str(uuid.uuid4()),
                           "delivery_info": {"exchange": "", "routing_key": "dspex.predict"}, "priority": 0},
        }
        client.redis.lpush("dspex.predict", json.dumps(message))
        # a healthy task afterwards proves the worker consumed past the pickled one
        assert client.submit("qa", {"question": "after the pickle"}).get(timeout=30).outputs
        wait_for(lambda: client.redis.llen("dspex.predict") == 0, timeout_s=10, what="queue drained")
        time.sleep(0.5)
        assert not canary.exists()
        assert "content" in w.log().lower() and ("refused" in w.log().lower() or "disallowed" in w.log().lower())
    finally:
        w.stop()


# -- security: a canary LM key never leaks ----------------------------------------------------------------
def test_canary_api_key_never_leaks(client: Client, redis_url: str, namespace: str, tmp_path: Path) -> None:
    canary = f"sk-canary-{uuid.uuid4().hex}"
    server = MockLMServer(port=0, latency_ms=1).start()
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": server.url, "DSPEX_LM_API_KEY": canary,
           "DSPEX_LM_NUM_RETRIES": "0", "DSPEX_TASK_MAX_RETRIES": "0"}
    # both queues: the optimization below must run and fail, not wait unserved until its timeout
    w = WorkerProcess(redis_url, namespace, queues="dspex.predict,dspex.optimize", log_dir=tmp_path, env=env,
                      name="canary")
    try:
        w.wait_ready()
        ready(client)
        ok = [client.submit("qa", {"question": f"c{i}"}, session="leak") for i in range(5)]
        assert all(j.get(timeout=30).outputs for j in ok)
        server.control(error_rate=1.0, status=401, echo_key=True)  # as providers do: the 401 quotes the key
        bad = [client.submit("qa", {"question": f"e{i}"}, session="leak") for i in range(3)]
        for j in bad:
            with pytest.raises(errors.DspexError):
                j.get(timeout=30)
        run = client.optimize("qa", [{"question": f"r{i}", "answer": "x"} for i in range(6)], session="leak")
        with pytest.raises(errors.LMAuthError):  # the run fails typed, it does not time out
            run.get(timeout=60)
    finally:
        w.stop()
        server.stop()
    dump = _dump_redis(client.redis)
    assert canary not in dump
    assert canary not in w.log()


def _dump_redis(r: Any) -> str:
    parts = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        if kind == "string":
            parts.append(repr(r.get(key)))
        elif kind == "hash":
            parts.append(repr(r.hgetall(key)))
        elif kind == "list":
            parts.append(repr(r.lrange(key, 0, -1)))
        elif kind == "set":
            parts.append(repr(r.smembers(key)))
        elif kind == "zset":
            parts.append(repr(r.zrange(key, 0, -1, withscores=True)))
        elif kind == "stream":
            parts.append(repr(r.xrange(key)))
    return "\n".join(parts)


# -- Redis auth ----------------------------------------------------------------------------------------------
def test_smoke_path_on_password_protected_redis(tmp_path: Path) -> None:
    with RedisServer(password="s3cret-pw") as server:
        unauth = server.url.replace(":s3cret-pw@", "")
        with pytest.raises(redis_lib.AuthenticationError):
            redis_lib.Redis.from_url(unauth).ping()
        w = WorkerProcess(server.url, "authed", log_dir=tmp_path, name="authed")
        c = Client(redis_url=server.url, namespace="authed")
        try:
            w.wait_ready()
            ready(c)
            assert c.submit("qa", {"question": "behind a password"}, session="a1").get(timeout=30).outputs
            assert c.map("qa", [{"question": f"m{i}"} for i in range(10)], session="a1")
        finally:
            c.close()
            w.stop()


# -- row 14: two beat processes ------------------------------------------------------------------------------
def test_two_beats_enqueue_each_tick_once(client: Client, redis_url: str, namespace: str, tmp_path: Path) -> None:
    from dspex_tasks.app import create_app
    from dspex_tasks.optimize.schedules import add_schedule
    from dspex_tasks.settings import Settings

    w = WorkerProcess(redis_url, namespace, queues="dspex.predict,dspex.optimize", log_dir=tmp_path,
                      env={"DSPEX_MOCK_SCENARIO": "learns_from_demos"}, name="beatwork")
    beats: list[subprocess.Popen[bytes]] = []
    try:
        w.wait_ready()
        ready(client)
        client.datasets.put("d14", [{"question": f"q{i}", "answer": "x"} for i in range(6)])
        app = create_app(Settings(redis_url=redis_url, namespace=namespace))
        add_schedule(app, "tick", signature="qa", dataset="d14", metric="exact_match",
                     optimizer="bootstrap_few_shot", session="b14", every_s=2)
        env = {**os.environ, "DSPEX_REDIS_URL": redis_url, "DSPEX_NAMESPACE": namespace, "PYTHONPATH": str(ROOT)}
        logs = [tmp_path / f"beat{i}.log" for i in range(2)]
        for log in logs:
            beats.append(subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "beat", "-l", "INFO"],
                                          cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        time.sleep(9)
        for b in beats:
            b.send_signal(signal.SIGTERM)
            b.wait(15)
        sent = [log.read_text().count("Sending due task tick") for log in logs]
        runs = client.runs.ids(session="b14", limit=100)
        # one beat holds the lock and sends; every tick makes exactly one run
        assert sorted(sent)[0] == 0 and 3 <= sum(sent) <= 6, sent
        assert len(runs) == sum(sent)
    finally:
        for b in beats:
            if b.poll() is None:
                os.killpg(b.pid, signal.SIGKILL)
        w.stop()
