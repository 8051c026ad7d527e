"""The delivery promises of docs/reliability.md with RabbitMQ as the broker (``DSPEX_BROKER_URL=amqp://...``).

Redis still holds programs, runs, events, limits and results (``DSPEX_REDIS_URL``); only the messages move.
The module runs in a vhost of its own (``amqp_url``); each test's queues are ``<namespace>.predict`` and
``<namespace>.optimize`` (no bare ``celery`` queue), deleted after it. Faults are real: signals to worker
processes, raw messages published straight into the queue. Quorum queues (``DSPEX_AMQP_QUEUE_TYPE=quorum``)
are checked for retries through native delayed delivery, ``x-delivery-limit`` and the poison guard.

RabbitMQ must answer (``DSPEX_TEST_AMQP_URL``, default the local guest account): otherwise these tests fail
saying so, unless ``DSPEX_TEST_AMQP_URL=off``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from dspex_tasks import errors
from dspex_tasks.app import QUORUM_DELIVERY_LIMIT
from dspex_tasks.client import Client
from dspex_tasks.connections import amqp_connection
from dspex_tasks.observability.status import amqp_queue_depths
from dspex_tasks.settings import Settings, load_settings
from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.worker.guard import dead_letters
from tests._procs import ROOT, WorkerProcess, wait_for, worker_env
from tests.system.test_faults import POISON_ENV
from tests.system.test_hostile_messages import MALFORMED

pytestmark = pytest.mark.system

#: Delayed-delivery entities Celery declares for quorum queues (deleted only if this test created them).
DELAYED = [f"celery_delayed_{level}" for level in range(28)]


@dataclass
class Rabbit:
    """One test's deployment: Redis for state, RabbitMQ for messages, a namespace and queues of its own."""

    redis_url: str
    amqp_url: str
    namespace: str
    tmp: Path
    extra: dict[str, str]

    @property
    def predict(self) -> str:
        return f"{self.namespace}.predict"

    @property
    def optimize(self) -> str:
        return f"{self.namespace}.optimize"

    def env(self, **extra: str) -> dict[str, str]:
        return {"DSPEX_BROKER_URL": self.amqp_url, "DSPEX_PREDICT_QUEUE": self.predict,
                "DSPEX_OPTIMIZE_QUEUE": self.optimize, "DSPEX_BARE_QUEUE": "", **self.extra, **extra}

    def settings(self, **overrides: Any) -> Settings:
        return load_settings(redis_url=self.redis_url, broker_url=self.amqp_url, namespace=self.namespace,
                             predict_queue=self.predict, optimize_queue=self.optimize, bare_queue="", **overrides)

    def client(self, **overrides: Any) -> Client:
        return Client(settings=self.settings(**overrides))

    def worker(self, name: str, *, queues: str | None = None, **kwargs: Any) -> WorkerProcess:
        """A worker on this deployment; ``queues=None`` consumes both of its queues (no ``-Q``)."""
        env = self.env(**kwargs.pop("env", {}))
        return WorkerProcess(self.redis_url, self.namespace, queues=queues, log_dir=self.tmp, env=env, name=name,
                             **kwargs)

    def dspex(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dspex_tasks", *args], cwd=ROOT, capture_output=True,
                              text=True, env=worker_env(self.redis_url, self.namespace, COLUMNS="200",
                                                        **self.env(**env)), timeout=60, check=False)

    def depths(self) -> dict[str, int]:
        with amqp_connection(self.amqp_url, 5.0) as conn:
            return amqp_queue_depths(conn, [self.predict, self.optimize])


def _existing(url: str, names: list[str]) -> set[str]:
    """Which of ``names`` exist as queues on the broker (passive declares)."""
    with amqp_connection(url, 5.0) as conn:
        channel = conn.channel()
        found = set()
        for name in names:
            try:
                channel.queue_declare(queue=name, passive=True)
                found.add(name)
            except Exception:  # 404 closes the channel
                channel = conn.channel()
        with contextlib.suppress(Exception):
            channel.close()
    return found


def _delete(url: str, names: list[str]) -> None:
    """Delete the queues and exchanges named ``names`` (each queue's exchange has its name)."""
    with amqp_connection(url, 5.0) as conn:
        for name in names:
            for op in ("queue_delete", "exchange_delete"):
                channel = conn.channel()
                with contextlib.suppress(Exception):
                    getattr(channel, op)(name)
                    channel.close()


@pytest.fixture
def rabbit(redis_url: str, namespace: str, amqp_url: str, tmp_path: Path) -> Iterator[Rabbit]:
    before = _existing(amqp_url, DELAYED)  # a user's quorum workers may share them: leave those alone
    target = Rabbit(redis_url, amqp_url, namespace, tmp_path, {})
    yield target
    ours = [target.predict, target.optimize] + [name for name in DELAYED if name not in before]
    _delete(amqp_url, ours + ([] if before else ["celery_delayed_delivery"]))


@pytest.fixture
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0, latency_ms=300).start()
    yield server
    server.stop()


def lm_env(mock_lm: MockLMServer, **extra: str) -> dict[str, str]:
    return {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
            "DSPEX_LM_NUM_RETRIES": "0", "DSPEX_LM_TIMEOUT_S": "5", **extra}


def _ready(client: Client) -> None:
    wait_for(lambda: "qa" in client.signatures(refresh=True), timeout_s=30, what="signatures published")


# -- the smoke path, dspex health and dspex status ---------------------------------------------------------------
def test_smoke_health_and_status_on_rabbitmq(rabbit: Rabbit) -> None:
    # Given a worker consuming only predictions, from RabbitMQ
    w = rabbit.worker("rmq-smoke", queues=rabbit.predict)
    client = rabbit.client()
    try:
        w.wait_ready(timeout_s=60)
        assert "transport:   amqp://guest:***@" in w.log() and "· broker amqp://" in w.log()
        _ready(client)
        # When a client submits, then the result comes back through Redis
        result = client.submit("qa", {"question": "over RabbitMQ"}, session="r1").get(timeout=30)
        assert result.outputs["answer"] and result.worker
        # and health passes, reading the queues' depths from RabbitMQ
        healthy = rabbit.dspex("health", "--json", "--timeout", "2")
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        data = json.loads(healthy.stdout)
        assert data["broker"]["ok"] and data["broker"]["kind"] == "rabbitmq" and "guest:***@" in data["broker"]["url"]
        assert data["queues"]["queues"][rabbit.predict]["depth"] == 0 and not data["queues"].get("skipped")
        # When an optimization-queue message waits with no consumer, then health fails naming it, status says stuck
        client.app.send_task("dspex.qa", kwargs={"inputs": {"question": "x"}}, queue=rabbit.optimize)
        sick = rabbit.dspex("health", "--json", "--timeout", "2")
        assert sick.returncode == 1, sick.stdout + sick.stderr
        data = json.loads(sick.stdout)
        assert data["failed"] == ["queues"] and data["queues"]["unconsumed"] == {rabbit.optimize: 1}
        assert f"{rabbit.optimize}: 1 waiting, no worker consumes it" in sick.stderr
        status = json.loads(rabbit.dspex("status", "--json").stdout)
        assert status["queues"] == {rabbit.predict: 0, rabbit.optimize: 1}
        assert status["unconsumed"] == {rabbit.optimize: 1} and status["consumers"][rabbit.predict] == [w.hostname]
        assert status["broker_url"].startswith("amqp://guest:***@")
        assert "no worker consumes it" in rabbit.dspex("status").stdout
    finally:
        client.close()
        w.stop()


def test_worker_health_and_status_without_rabbitmq_say_so_in_one_line(rabbit: Rabbit) -> None:
    dead = "amqp://guest:guest@127.0.0.1:1//"
    t0 = time.monotonic()
    w = rabbit.worker("rmq-dead", env={"DSPEX_BROKER_URL": dead, "DSPEX_REDIS_WAIT_S": "1"})
    try:
        code = w.proc.wait(30)
    finally:
        w.stop()
    assert code == 69, w.log()
    lines = [line for line in w.log().splitlines() if "cannot reach RabbitMQ" in line]
    assert len(lines) == 1 and "Traceback" not in w.log(), w.log()
    assert "amqp://guest:***@127.0.0.1:1//" in lines[0] and "DSPEX_BROKER_URL" in lines[0]
    assert "Connection refused" in lines[0]
    health = rabbit.dspex("health", "--json", "--timeout", "1", DSPEX_BROKER_URL=dead)
    assert health.returncode == 1
    data = json.loads(health.stdout)
    assert data["failed"] == ["broker"] and "Connection refused" in data["broker"]["error"]
    status = rabbit.dspex("status", DSPEX_BROKER_URL=dead)
    assert status.returncode == 1 and "cannot reach RabbitMQ" in status.stderr and "DSPEX_BROKER_URL" in status.stderr
    assert "Traceback" not in status.stderr
    gateway = rabbit.dspex("gateway", "--port", "0", DSPEX_BROKER_URL=dead, DSPEX_REDIS_WAIT_S="1")
    assert gateway.returncode == 69, gateway.stdout + gateway.stderr
    assert [line for line in gateway.stderr.splitlines() if "cannot reach RabbitMQ" in line and dead.replace(
        "guest:guest", "guest:***") in line and "DSPEX_BROKER_URL" in line], gateway.stderr
    assert time.monotonic() - t0 < 30


# -- delivery under faults -------------------------------------------------------------------------------------------
def test_whole_worker_killed_under_load_loses_nothing(rabbit: Rabbit, mock_lm: MockLMServer) -> None:
    mock_lm.control(latency_ms=1500)  # calls stay in flight while the jobs are still being sent
    env = lm_env(mock_lm)
    client = rabbit.client()
    a = rabbit.worker("rmq-doomed", queues=rabbit.predict, concurrency=50, env=env)
    b = None
    try:
        a.wait_ready()
        _ready(client)
        mock_lm.control(reset_stats=True)
        jobs = [client.submit("qa", {"question": f"load {i}"}, session=f"k{i % 7}") for i in range(120)]
        wait_for(lambda: mock_lm.stats()["in_flight"] >= 25, timeout_s=20, what="calls in flight")
        # When the worker (main process and every thread) is SIGKILLed with work in flight
        assert mock_lm.stats()["requests"] < 120
        t_kill = time.time()
        a.kill_group()
        a.stop()
        b = rabbit.worker("rmq-heir", queues=rabbit.predict, concurrency=50, env=env)
        b.wait_ready()
        # Then every job's result arrives, each once: RabbitMQ requeued them when the connection closed,
        # with no visibility timeout to wait out (DSPEX_VISIBILITY_TIMEOUT_S is its default, 3600 s)
        results = [j.get(timeout=60) for j in jobs]
        elapsed = time.time() - t_kill
        assert len({r.task_id for r in results}) == 120 and all(r.outputs["answer"] for r in results)
        assert elapsed < 45, elapsed  # far below DSPEX_VISIBILITY_TIMEOUT_S: nothing waited for a timeout
        assert rabbit.depths()[rabbit.predict] == 0
    finally:
        client.close()
        for w in (a, b):
            if w is not None:
                w.stop()


def test_sigterm_finishes_in_flight_work_and_loses_none(rabbit: Rabbit, mock_lm: MockLMServer) -> None:
    mock_lm.control(latency_ms=1500, reset_stats=True)
    env = lm_env(mock_lm)
    client = rabbit.client()
    a = rabbit.worker("rmq-leaver", queues=rabbit.predict, concurrency=8, env=env)
    b = rabbit.worker("rmq-stayer", queues=rabbit.predict, concurrency=8, env=env)
    try:
        a.wait_ready()
        b.wait_ready()
        _ready(client)
        jobs = [client.submit("qa", {"question": f"t{i}"}) for i in range(32)]
        wait_for(lambda: mock_lm.stats()["in_flight"] >= 8, timeout_s=10, what="calls in flight")
        # When one worker gets SIGTERM while its calls are in flight (a rolling restart)
        a.send(signal.SIGTERM)
        assert a.proc.wait(30) == 0  # warm shutdown: it waited for its in-flight tasks
        # Then every job succeeds exactly once, and the provider saw each question once
        results = [j.get(timeout=60) for j in jobs]
        assert len({r.task_id for r in results}) == 32
        assert mock_lm.stats()["requests"] == 32
        assert "warm shutdown" in a.log().lower()
    finally:
        client.close()
        a.stop()
        b.stop()


def test_killed_pool_child_reruns_and_poison_message_is_dead_lettered(rabbit: Rabbit) -> None:
    env = {**POISON_ENV, "DSPEX_WORKER_POOL": "prefork", "DSPEX_WORKER_CONCURRENCY": "2", "DSPEX_MAX_DELIVERIES": "3"}
    w = rabbit.worker("rmq-pref", queues=rabbit.predict, pool="prefork", concurrency=2, env=env)
    client = rabbit.client()
    try:
        w.wait_ready(timeout_s=60)
        _ready(client)
        marker = rabbit.tmp / "died-once"
        # Given a task whose pool child is SIGKILLed the first time it runs, then it runs again and succeeds
        res = client.submit("qa", {"question": f"ONCE:{marker}"}, session="f1").get(timeout=60)
        assert marker.exists() and res.outputs["answer"]
        # Given a message that kills its child every time, then RabbitMQ marks each requeue redelivered and
        # the guard sets it aside after N deliveries
        poison = client.submit("qa", {"question": "POISON pill"}, session="f1")
        with pytest.raises(errors.DeadLettered, match="delivered 4 times"):
            poison.get(timeout=90)
        assert [d["task_id"] for d in dead_letters(client.redis, rabbit.namespace)] == [poison.id]
        # and the worker keeps serving
        assert client.submit("qa", {"question": "healthy"}).get(timeout=30).outputs["answer"]
        assert rabbit.depths()[rabbit.predict] == 0
    finally:
        client.close()
        w.stop()


def _restart_rabbitmq(url: str) -> None:
    """Stop and start the RabbitMQ application (``rabbitmqctl``, on the broker's own host); wait until it answers."""
    import shutil

    from dspex_tasks.connections import ping

    exe = shutil.which("rabbitmqctl")
    if exe is None or (urlsplit(url).hostname or "") not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip("restarting RabbitMQ needs rabbitmqctl on the broker's host (DSPEX_TEST_AMQP_URL is remote)")
    if subprocess.run([exe, "-q", "stop_app"], capture_output=True, timeout=60, check=False).returncode != 0:
        pytest.skip("rabbitmqctl cannot control this RabbitMQ (not root?)")
    try:
        time.sleep(1.0)
    finally:
        subprocess.run([exe, "-q", "start_app"], capture_output=True, timeout=120, check=True)
    wait_for(lambda: _answers(url, ping), timeout_s=60, what="RabbitMQ back")


def _answers(url: str, ping: Any) -> bool:
    try:
        ping(url, 2.0)
    except Exception:
        return False
    return True


def test_messages_survive_a_rabbitmq_restart_and_workers_resume(rabbit: Rabbit) -> None:
    client = rabbit.client()
    w = rabbit.worker("rmq-first", queues=rabbit.predict)
    try:
        w.wait_ready(timeout_s=60)
        _ready(client)
    finally:
        w.stop()
    # Given a job queued while no worker runs, when RabbitMQ restarts, then it is still there and served
    queued = client.submit("qa", {"question": "queued across a restart"})
    _restart_rabbitmq(rabbit.amqp_url)
    assert rabbit.depths()[rabbit.predict] == 1  # a durable queue, a persistent message
    w = rabbit.worker("rmq-survivor", queues=rabbit.predict)
    try:
        w.wait_ready(timeout_s=60)
        assert queued.get(timeout=30).outputs["answer"]
        # When RabbitMQ restarts under a running worker, then the worker reconnects and serves again
        _restart_rabbitmq(rabbit.amqp_url)
        deadline = time.time() + 40
        while True:
            try:
                assert client.submit("qa", {"question": "after the restart"}).get(timeout=10).outputs["answer"]
                break
            except (errors.DspexError, OSError, ConnectionError) as exc:
                assert time.time() < deadline, f"worker did not resume after a RabbitMQ restart: {exc!r}"
                time.sleep(1)
    finally:
        client.close()
        w.stop()


def _publish_raw(url: str, queue: str, body: bytes, *, content_type: str, headers: dict[str, Any],
                 task_id: str | None) -> None:
    """A message as any AMQP client could publish it: py-amqp's basic_publish, nothing tidied by kombu."""
    import amqp

    with amqp_connection(url, 5.0) as conn:
        channel = conn.channel()
        props: dict[str, Any] = {"content_type": content_type, "content_encoding": "utf-8", "delivery_mode": 2,
                                 "application_headers": headers}
        if task_id:
            props["correlation_id"] = task_id
        channel.basic_publish(amqp.Message(body, **props), exchange="", routing_key=queue)
        channel.close()


def _headers(task_id: str | None, **extra: Any) -> dict[str, Any]:
    head: dict[str, Any] = {"lang": "py", "task": "dspex.qa", "id": task_id, "root_id": task_id,
                            "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
                            "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}", "origin": "hostile"}
    if task_id is None:
        del head["id"]
    head.update(extra)
    return head


def test_malformed_messages_are_dead_lettered_and_the_same_worker_keeps_serving(rabbit: Rabbit) -> None:
    from celery import Celery

    w = rabbit.worker("rmq-hostile", queues=rabbit.predict, concurrency=4)
    client = rabbit.client()
    bare = Celery(broker=rabbit.amqp_url, backend=rabbit.redis_url)  # a raw sender: no client-side checks
    try:
        w.wait_ready(timeout_s=60)
        pid = w.pid
        _ready(client)  # the worker declared its queue: raw publishes to it are not dropped
        # Given one raw AMQP message per malformed variant of the Redis test (each with its own task id)
        sent: dict[str, str | None] = {}
        for name, (body, opts) in MALFORMED.items():
            opts = dict(opts)
            tid = opts.pop("task_id", f"bad-{name}")
            sent[name] = tid
            _publish_raw(rabbit.amqp_url, rabbit.predict, body, task_id=tid,
                         content_type=opts.pop("content_type", "application/json"), headers=_headers(tid, **opts))
        # and a compression bomb (20 MB of zeros), and a body past the raw-body cap
        bomb = zlib.compress(b"\0" * 20_000_000, 9)
        _publish_raw(rabbit.amqp_url, rabbit.predict, bomb, task_id="bad-gzip-bomb", content_type="application/json",
                     headers=_headers("bad-gzip-bomb", compression="application/x-gzip"))
        sent["gzip_bomb"] = "bad-gzip-bomb"
        huge = bare.send_task("dspex.qa", kwargs={"inputs": {"question": "x" * 3_000_000}}, queue=rabbit.predict)
        # When a valid task follows them
        assert client.submit("qa", {"question": "after the hostile ones"}).get(timeout=30).outputs
        # Then the same worker process served it, and never crashed
        assert w.proc.poll() is None and w.pid == pid and "Unrecoverable error" not in w.log()
        # each malformed message is dead-lettered with a reason, and acknowledged
        wait_for(lambda: rabbit.depths()[rabbit.predict] == 0, timeout_s=15, what="queue drained")
        letters = dead_letters(client.redis, rabbit.namespace, limit=1000)
        for name, tid in sent.items():
            found = [d for d in letters if d.get("task_id") == tid and d.get("reason")]
            assert found, f"{name} not dead-lettered: {letters}"
            assert found[0]["task"] == "dspex.qa"
        assert any(d.get("task_id") == huge.id and "bytes" in d["reason"] for d in letters)
        with pytest.raises(Exception, match="refused"):
            huge.get(timeout=10)
    finally:
        bare.close()
        client.close()
        w.stop()
    # nothing was left unacknowledged: the stopped worker's channel handed nothing back
    assert rabbit.depths()[rabbit.predict] == 0


# -- quorum queues -----------------------------------------------------------------------------------------------------
def test_quorum_queues_retry_by_native_delayed_delivery_and_dead_letter_poison(rabbit: Rabbit,
                                                                              mock_lm: MockLMServer) -> None:
    from amqp.exceptions import PreconditionFailed

    rabbit.extra = {"DSPEX_AMQP_QUEUE_TYPE": "quorum"}
    client = rabbit.client(amqp_queue_type="quorum")
    mock_lm.control(latency_ms=5)
    w = rabbit.worker("rmq-quorum", queues=rabbit.predict, env=lm_env(mock_lm))
    try:
        w.wait_ready(timeout_s=60)
        _ready(client)
        # the queue is a quorum queue (declaring it classic is refused) bound to a topic exchange
        with amqp_connection(rabbit.amqp_url, 5.0) as conn, pytest.raises(PreconditionFailed, match="x-queue-type"):
            conn.channel().queue_declare(queue=rabbit.predict, durable=True, auto_delete=False,
                                        arguments={"x-queue-type": "classic"})
        assert "do not support direct exchanges" not in w.log()
        # Given a 503 on the first call, then the task is retried with a countdown and succeeds
        mock_lm.control(reset_stats=True, fail_next=1, status=503)
        assert client.submit("qa", {"question": "retried by countdown"}).get(timeout=30).outputs["answer"]
        log = mock_lm.request_log()
        assert [e["status"] for e in log] == [503, 200] and log[1]["t"] - log[0]["t"] >= 1.0
        assert "not supported with native delayed delivery" not in w.log()  # Celery's fallback: the worker holds it
        # A countdown waits in RabbitMQ's delay queues (celery_delayed_*), not held by a worker
        delayed = client.app.send_task("dspex.qa", kwargs={"inputs": {"question": "later"}}, countdown=3)
        time.sleep(0.5)
        assert sum(_delay_depths(rabbit.amqp_url).values()) == 1 and rabbit.depths()[rabbit.predict] == 0
        assert delayed.get(timeout=20)["outputs"]["answer"]
    finally:
        w.stop()
    # With no worker: RabbitMQ itself drops a message returned more than x-delivery-limit times (the backstop)
    assert _deliveries_until_dropped(rabbit.amqp_url, rabbit.predict) == QUORUM_DELIVERY_LIMIT + 1
    # Given a message that kills its worker's pool child every time
    env = {**POISON_ENV, "DSPEX_WORKER_POOL": "prefork", "DSPEX_WORKER_CONCURRENCY": "2", "DSPEX_MAX_DELIVERIES": "2"}
    w = rabbit.worker("rmq-quorum-pref", queues=rabbit.predict, pool="prefork", concurrency=2, env=env)
    try:
        w.wait_ready(timeout_s=60)
        poison = client.submit("qa", {"question": "POISON pill"})
        # Then the guard dead-letters it after DSPEX_MAX_DELIVERIES (x-delivery-limit did not drop it first)
        with pytest.raises(errors.DeadLettered, match="delivered 3 times"):
            poison.get(timeout=60)
        assert [d["task_id"] for d in dead_letters(client.redis, rabbit.namespace)] == [poison.id]
        # and the worker keeps serving
        assert client.submit("qa", {"question": "healthy"}).get(timeout=30).outputs["answer"]
    finally:
        client.close()
        w.stop()


def _delay_depths(url: str) -> dict[str, int]:
    with amqp_connection(url, 5.0) as conn:
        return {q: n for q, n in amqp_queue_depths(conn, DELAYED).items() if n}


def _deliveries_until_dropped(url: str, queue: str) -> int:
    """Publish one message, then get and requeue it until the queue no longer hands it out: how many gets."""
    import amqp

    with amqp_connection(url, 5.0) as conn:
        channel = conn.channel()
        channel.basic_publish(amqp.Message(b"[]", content_type="application/json"), exchange="", routing_key=queue)
        for got in range(100):
            message = None
            for _ in range(50):  # a requeued message is back within milliseconds
                message = channel.basic_get(queue=queue)
                if message is not None:
                    break
                time.sleep(0.02)
            if message is None:
                return got
            channel.basic_reject(message.delivery_tag, requeue=True)
        raise AssertionError("never dropped")


def test_quorum_configuration_keeps_the_bare_queue_classic_and_the_limit_above_the_guard() -> None:
    from dspex_tasks.app import celery_config

    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    classic = celery_config(Settings(broker_url=amqp))
    assert classic["broker_transport_options"] == {"confirm_publish": True} and "broker_transport" not in classic
    assert all(q.exchange.type == "direct" and not q.queue_arguments for q in classic["task_queues"])
    quorum = {q.name: q for q in celery_config(Settings(broker_url=amqp, amqp_queue_type="quorum"))["task_queues"]}
    for name in ("dspex.predict", "dspex.optimize"):
        assert quorum[name].exchange.type == "topic"
        assert quorum[name].queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": QUORUM_DELIVERY_LIMIT}
    assert quorum["celery"].exchange.type == "direct" and not quorum["celery"].queue_arguments
    # the guard always acts before RabbitMQ drops a message, however high DSPEX_MAX_DELIVERIES is set
    high = celery_config(Settings(broker_url=amqp, amqp_queue_type="quorum", max_deliveries=40))["task_queues"][0]
    assert high.queue_arguments["x-delivery-limit"] == 41
    # a Redis broker ignores the setting
    redis = celery_config(Settings(amqp_queue_type="quorum"))["task_queues"]
    assert all(not q.queue_arguments for q in redis)


# -- the tests themselves, and Flower's configuration -------------------------------------------------------------------
@pytest.mark.parametrize(("url", "outcome", "says"), [
    ("amqp://guest:guest@127.0.0.1:1//", "1 error", "RabbitMQ does not answer at amqp://guest:***@127.0.0.1:1//"),
    ("off", "1 skipped", "RabbitMQ broker tests off (DSPEX_TEST_AMQP_URL=off)"),
])
def test_without_rabbitmq_these_tests_fail_unless_turned_off(url: str, outcome: str, says: str) -> None:
    env = {k: v for k, v in worker_env("redis://127.0.0.1:1/0", "x").items() if not k.startswith("DSPEX_")}
    env["DSPEX_TEST_AMQP_URL"] = url
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"{Path(__file__)}::test_smoke_health_and_status_on_rabbitmq"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert outcome in proc.stdout and says in proc.stdout, proc.stdout + proc.stderr


def test_flower_reads_the_management_api_url_from_dspex_flower_broker_api(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    import runpy

    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith(("FLOWER_", "DSPEX_FLOWER_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "u:p")
    monkeypatch.setattr(sys, "argv", ["celery", "-A", "workers.app", "flower"])
    assert "broker_api" not in runpy.run_path(str(ROOT / "flower_config.py"))  # Flower's own guess
    monkeypatch.setenv("DSPEX_FLOWER_BROKER_API", "http://ops:pw@rabbit:15672/api/")
    assert runpy.run_path(str(ROOT / "flower_config.py"))["broker_api"] == "http://ops:pw@rabbit:15672/api/"
    monkeypatch.setenv("FLOWER_BROKER_API", "http://other:15672/api/")  # Flower's own variable wins
    assert "broker_api" not in runpy.run_path(str(ROOT / "flower_config.py"))
