"""Layer 2: a full Redis (``maxmemory``, policy ``noeviction``) is a typed ``errors.StoreFull`` everywhere a client
writes, never a raw ``OutOfMemoryError``; reads keep working; the broker-side ack and requeue helpers work where
kombu's own are refused (issue 13, item 7).

Each test runs against a private password-protected ``redis-server`` with ``--maxmemory 8mb``, filled with one
filler key until Redis refuses writes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis.exceptions import OutOfMemoryError

from dspex_tasks import errors, keys
from dspex_tasks.client import Client
from dspex_tasks.connections import is_store_full
from dspex_tasks.dsl.signature import SignatureRegistry
from dspex_tasks.settings import load_settings
from dspex_tasks.testing.redis_server import RedisServer
from dspex_tasks.worker.storefull import StoreFullBackend, forget_unacked, requeue_unacked

pytestmark = pytest.mark.redis

PASSWORD = "full-redis-secret-42"
MAXMEMORY = 8 * 1024 * 1024


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


@pytest.fixture(scope="module")
def full_server() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD, extra_args=["--maxmemory", "8mb"]) as server:
        yield server


@pytest.fixture
def raw(full_server: RedisServer) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(full_server.url)
    r.flushall()
    yield r
    free(r)
    r.close()


@pytest.fixture
def full_client(full_server: RedisServer, raw: redis.Redis, signatures: SignatureRegistry) -> Iterator[Client]:
    from dspex_tasks.worker.runtime import publish_signatures

    ns = f"full{uuid.uuid4().hex[:6]}"
    publish_signatures(raw, ns, list(signatures))
    client = Client(redis_url=full_server.url, namespace=ns)
    yield client
    client.close()


def _assert_typed(exc: errors.StoreFull) -> None:
    text = str(exc)
    assert "maxmemory" in text and "127.0.0.1" in text
    assert PASSWORD not in text and "***" in text  # the URL, its password redacted
    assert exc.code == "store_full" and isinstance(exc, errors.DspexError)


def test_every_client_write_on_a_full_redis_is_store_full_and_enqueues_nothing(
        full_client: Client, raw: redis.Redis) -> None:
    ns = full_client.settings.namespace
    queue = full_client.settings.predict_queue
    queued = full_client.submit("qa", {"question": "before"})  # no worker: it stays queued
    # A job that finished before Redis filled up
    done_id = str(uuid.uuid4())
    full_client.app.backend.store_result(done_id, {"outputs": {"answer": "a", "confidence": 0.5}, "program": "qa"},
                                         "SUCCESS")
    # Given Redis is full
    fill(raw)
    depth = raw.llen(queue)
    assert depth == 1
    trainset = [{"question": f"q{i}", "answer": "a"} for i in range(4)]
    calls = {
        "submit": lambda: full_client.submit("qa", {"question": "full"}),
        "map": lambda: full_client.map("qa", [{"question": "m1"}, {"question": "m2"}], timeout=5),
        "optimize": lambda: full_client.optimize("qa", trainset, session="s1"),
        "programs.put": lambda: full_client.programs.put("s1", "qa", {"demos": []}, signature="qa"),
        "datasets.put": lambda: full_client.datasets.put("d1", trainset),
    }
    for what, call in calls.items():
        # Then each raises StoreFull (not a raw OutOfMemoryError, not a kombu OperationalError)
        with pytest.raises(errors.StoreFull) as caught:
            call()
        _assert_typed(caught.value)
        assert is_store_full(caught.value), what
    # And nothing was enqueued or written
    assert raw.llen(queue) == depth
    assert not raw.exists(keys.dataset(ns, "d1")) and not raw.exists(keys.runs(ns))
    # And reading keeps working: a finished job's result, a queued job's state, the published signatures
    assert full_client.job(done_id).get(timeout=5).outputs == {"answer": "a", "confidence": 0.5}
    assert queued.state == "PENDING" and "qa" in full_client.signatures(refresh=True)
    # When memory is freed, the same calls go through
    free(raw)
    full_client.submit("qa", {"question": "after"})
    assert raw.llen(queue) == depth + 1
    assert full_client.programs.put("s1", "qa", {"demos": []}, signature="qa") == 1


def test_store_full_is_a_507_problem() -> None:
    from dspex_tasks.gateway.problems import problem_for_error, status_for

    exc = errors.StoreFull("Redis at redis://:***@h:6379/0 is full ... maxmemory")
    assert status_for(exc) == 507
    response = problem_for_error(exc, instance="/v1/sessions/s/programs/p")
    body = json.loads(bytes(response.body))
    assert response.status_code == 507 and response.media_type == "application/problem+json"
    assert body["code"] == "store_full" and body["title"] == "Insufficient Storage" and "maxmemory" in body["detail"]


def test_the_gateway_answers_507_problem_json_when_redis_is_full(full_client: Client, raw: redis.Redis) -> None:
    from fastapi.testclient import TestClient

    from dspex_tasks.gateway import create_gateway

    settings = full_client.settings.model_copy(update={"gateway_auth": False})
    app = create_gateway(settings, client=full_client)
    with TestClient(app, client=("127.0.0.1", 50000), raise_server_exceptions=False) as http:
        fill(raw)
        response = http.put("/v1/sessions/s1/programs/qa", json={"state": {"demos": []}, "signature": "qa"})
        submitted = http.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "hi"}})
    assert response.status_code == 507, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == "store_full" and "maxmemory" in body["detail"] and PASSWORD not in body["detail"]
    assert submitted.status_code == 507, submitted.text


def test_the_result_backend_never_stores_a_raw_redis_error_and_never_waits_outside_a_task(
        full_server: RedisServer, raw: redis.Redis) -> None:
    from dspex_tasks.app import create_app

    app = create_app(load_settings(redis_url=full_server.url, namespace="fullbe", store_full_wait_s=30))
    try:
        backend = app.backend
        assert isinstance(backend, StoreFullBackend)
        fill(raw)
        # Outside a task (the consumer's thread, a client) a refused write is typed at once, never waited on
        t0 = time.monotonic()
        with pytest.raises(errors.StoreFull) as caught:
            backend.store_result("t-1", {"outputs": {}}, "SUCCESS")
        assert time.monotonic() - t0 < 2
        _assert_typed(caught.value)
        assert backend.gate.full  # and the worker's gate knows
        # A failure caused by a full Redis is stored as the typed StoreFull, not as the raw Redis error
        with pytest.raises(OutOfMemoryError) as oom:
            raw.set("x", "y")
        free(raw)
        backend.mark_as_failure("t-2", oom.value)
        stored = json.loads(raw.get(backend.get_key_for_task("t-2")))
        assert stored["status"] == "FAILURE" and stored["result"]["exc_type"] == "StoreFull", stored
        with pytest.raises(errors.StoreFull):
            Client(redis_url=full_server.url, namespace="fullbe", app=app).job("t-2").get(timeout=5)
        # A write that goes through tells the gate Redis has room again
        backend.store_result("t-3", {"outputs": {}}, "SUCCESS")
        assert not backend.gate.full
    finally:
        app.close()


def test_ack_and_requeue_helpers_work_where_kombu_is_refused(full_server: RedisServer, raw: redis.Redis) -> None:
    from kombu import Connection

    with Connection(full_server.url) as conn:
        q = conn.SimpleQueue("full-q")
        q.put({"n": 1})
        q.put({"n": 2})
        first, second = q.get(timeout=2), q.get(timeout=2)
        qos = first.channel.qos
        assert raw.hlen(qos.unacked_key) == 2
        fill(raw)
        # kombu's own ack and requeue run in a MULTI, which a full Redis 7 refuses as a whole (the worker died)
        with pytest.raises(OutOfMemoryError):
            first.ack()
        with pytest.raises(OutOfMemoryError):
            qos.restore_by_tag(second.delivery_tag, leftmost=True)
        # The helpers go through: the first message acknowledged, the second back on its queue, once
        with conn.channel() as ch:
            client = ch.client
            forget_unacked(client, qos.unacked_key, qos.unacked_index_key, first.delivery_tag)
        assert requeue_unacked(qos, second.delivery_tag, leftmost=True) is True
        assert requeue_unacked(qos, second.delivery_tag, leftmost=True) is False  # never doubled
        assert raw.hlen(qos.unacked_key) == 0 and raw.zcard(qos.unacked_index_key) == 0
        assert raw.llen("full-q") == 1
        requeued = json.loads(raw.lindex("full-q", 0))
        assert requeued["properties"]["delivery_info"]["redelivered"] is True
        free(raw)
        again = q.get(timeout=2)
        assert again.payload == {"n": 2}
        again.ack()
        q.close()
