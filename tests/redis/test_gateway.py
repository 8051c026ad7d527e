"""Layer 2: the HTTP gateway on a real uvicorn server (in a thread), a real Redis and an in-process worker."""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from dspex_tasks import keys
from dspex_tasks.connections import redis_client
from dspex_tasks.gateway import create_gateway
from dspex_tasks.gateway.auth import KeyStore, hash_key

pytestmark = pytest.mark.redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    app: Any
    settings: Any

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)


class UvicornThread:
    """A real uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def gw_settings(redis_base_url: str) -> Iterator[Any]:
    """A namespace and queues of this module's own (the per-test fixtures flush the DB; these do not)."""
    from dspex_tasks.settings import Settings

    ns = f"gw{uuid.uuid4().hex[:8]}"
    yield Settings(redis_url=redis_base_url, namespace=ns, predict_queue=f"{ns}.predict",
                    optimize_queue=f"{ns}.optimize", worker_concurrency=8, prewarm_sessions=10, cache_verify_s=0.2,
                    gateway_rate_per_min=100_000)
    gc.collect()  # last: Celery results left in reference cycles unsubscribe while Redis is still up


@pytest.fixture(scope="module")
def gw_worker(gw_settings: Any) -> Iterator[Any]:
    """One in-process worker for the module, serving qa and complex_analysis on both queues."""
    from dspex_tasks.dsl.signature import SignatureRegistry, signature
    from dspex_tasks.testing.plugin import in_process_worker
    from dspex_tasks.worker.app import create_worker_app

    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str, confidence: confidence_score", name="qa", register=False))
    reg.add(signature("text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, "
                      "entities: list[entity]", name="complex_analysis", register=False))
    app = create_worker_app(gw_settings, signatures=reg, import_modules=False)
    with in_process_worker(app, queues=[gw_settings.predict_queue, gw_settings.optimize_queue]):
        # pay the process's first prediction (lazy imports) before the tests
        app.runtime.predict(reg.get("qa"), {"question": "warm-up"})
        yield app


@pytest.fixture(scope="module")
def redis_module(gw_settings: Any) -> Iterator[Any]:
    import redis

    r = redis.Redis.from_url(gw_settings.redis_url)
    yield r
    r.close()


@pytest.fixture(scope="module")
def _started(gw_worker: Any) -> Iterator[list[tuple[UvicornThread, Any]]]:
    started: list[tuple[UvicornThread, Any]] = []
    yield started
    for server, client in reversed(started):
        server.__exit__()
        client.close()


@pytest.fixture(scope="module")
def serve(gw_settings: Any, _started: list[tuple[UvicornThread, Any]]) -> Callable[..., Served]:
    """Start a gateway with settings overrides (stopped at the end of the module)."""
    from dspex_tasks.client import Client

    def start(**overrides: Any) -> Served:
        s = gw_settings.model_copy(update=overrides)
        client = Client(settings=s)
        app = create_gateway(s, client=client)
        server = UvicornThread(app).__enter__()
        _started.append((server, client))
        return Served(f"http://127.0.0.1:{server.port}", app, s)

    return start


@pytest.fixture(scope="module")
def gw(serve: Callable[..., Served]) -> Served:
    """The module's default gateway (auth on, a high rate limit)."""
    return serve()


@pytest.fixture(scope="module")
def key_store(redis_module: Any, gw_settings: Any) -> KeyStore:
    return KeyStore(redis=redis_module, namespace=gw_settings.namespace)


@pytest.fixture(scope="module")
def api_key(key_store: KeyStore) -> str:
    """An admin key: these tests are about everything but scopes (those: ``test_gateway_scopes``)."""
    raw, _ = key_store.create("tests", rights=["admin"])
    return raw


def test_auth_is_required_and_keys_are_stored_hashed(gw: Served, key_store: KeyStore, redis_module: Any) -> None:
    with gw.client() as anon:
        r = anon.get("/v1/signatures")
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["status"] == 401 and body["code"] == "unauthorized" and body["instance"] == "/v1/signatures"
        assert "Bearer" in r.headers["www-authenticate"]
        forged = {"Authorization": "Bearer dsk_00000000_" + "x" * 43}
        assert anon.get("/v1/signatures", headers=forged).status_code == 401
        assert anon.get("/healthz").status_code == 200 and anon.get("/openapi.json").status_code == 200
    raw, record = key_store.create("svc-a")
    stored = redis_module.hgetall(keys.gateway_api_keys(gw.settings.namespace))
    assert raw.encode() not in b"".join([*stored, *stored.values()])  # the raw key is never stored
    assert hash_key(raw).encode() in stored and json.loads(stored[hash_key(raw).encode()])["name"] == "svc-a"
    with gw.client(raw) as c:
        assert c.get("/v1/signatures").status_code == 200
        assert c.get("/v1/signatures", headers={"Authorization": "", "X-API-Key": raw}).status_code == 200
    assert [k.id for k in key_store.revoke("svc-a")] == [record.id]
    with gw.client(raw) as c:
        assert c.get("/v1/signatures").status_code == 401


def test_metrics_need_a_key_and_count_requests_by_route_template(gw: Served, api_key: str, tmp_path: Any) -> None:
    import os
    import shutil
    import subprocess
    from pathlib import Path

    with gw.client() as anon:
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 401  # refused: counted too
    with gw.client(api_key) as c:
        c.get("/v1/jobs/0123456789abcdef0123456789abcdef")
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    # the route template, never the raw path (bounded label values); refused requests are counted
    assert 'route="/v1/jobs/{job_id}"' in text and "0123456789abcdef" not in text
    assert 'dspex_gateway_requests_total{method="GET",route="(unmatched)",status="401"}' in text
    assert "dspex_gateway_requests_in_progress" in text and "process_resident_memory_bytes" in text
    with gw.client(api_key) as c:
        assert "/metrics" not in c.get("/openapi.json").json()["paths"]  # not an API operation
    local = Path(__file__).resolve().parents[2] / ".cache" / "bin" / "promtool"
    promtool = os.environ.get("DSPEX_TEST_PROMTOOL") or shutil.which("promtool") or (str(local) if local.exists() else None)
    if promtool:
        r2 = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
        assert r2.returncode == 0, (r2.stdout + r2.stderr).decode()


def test_rate_limit_answers_429_with_retry_after(serve: Callable[..., Served], key_store: KeyStore) -> None:
    gw = serve(gateway_rate_per_min=5)
    limited, _ = key_store.create("limited")
    with gw.client(limited) as c:
        codes = [c.get("/v1/signatures").status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        r = c.get("/v1/signatures")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["code"] == "rate_limited" and r.json()["retry_after"] == int(r.headers["retry-after"])
    other, _ = key_store.create("other", rate_per_min=1000)  # per key: its own bucket and its own limit
    with gw.client(other) as c:
        assert [c.get("/v1/signatures").status_code for _ in range(8)] == [200] * 8


def test_oversized_body_is_413(serve: Callable[..., Served], api_key: str) -> None:
    gw = serve(gateway_max_body_bytes=2000)
    with gw.client(api_key) as c:
        r = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "x" * 5000}})
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
            yield b'{"inputs": {"question": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}}'

        r = c.post("/v1/signatures/qa/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"


def test_validation_problem_names_fields(gw: Served, api_key: str) -> None:
    with gw.client(api_key) as c:
        r = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": 3}})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        p = r.json()
        assert p["code"] == "validation_error" and p["errors"][0]["field"] == "question"
        assert p["errors"][0]["pointer"] == "/inputs/question" and p["type"].endswith("validation_error")
        r = c.post("/v1/signatures/qa/jobs", json={"inputs": {}, "session": "bad id", "extra": 1})
        assert {e["field"] for e in r.json()["errors"]} == {"extra", "session"}
        r = c.post("/v1/signatures/qa/jobs", json={"inputs": {}})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "question"
        r = c.post("/v1/signatures/qa/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == "malformed_json"
        r = c.post("/v1/signatures/nope/jobs", json={"inputs": {}})
        assert r.status_code == 404 and r.json()["code"] == "unknown_signature"
        r = c.put("/v1/sessions/s1/programs/qa", json={"state": "not an object"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "state"


def test_submit_poll_and_run(gw: Served, api_key: str) -> None:
    with gw.client(api_key) as c:
        r = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "Why is the sky blue?"}, "session": "t42"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] == "PENDING" and r.headers["location"] == f"/v1/signatures/qa/jobs/{job['id']}"
        deadline = time.monotonic() + 20
        while (view := c.get(f"/v1/jobs/{job['id']}").json())["state"] != "SUCCESS":
            assert time.monotonic() < deadline, view
            time.sleep(0.05)
        assert view["signature"] == "qa" and view["result"]["session"] == "t42"
        assert set(view["result"]["outputs"]) == {"answer", "confidence"}
        assert c.get(r.headers["location"]).json() == view
        assert c.get(f"/v1/signatures/complex_analysis/jobs/{job['id']}").status_code == 404
        assert c.get("/v1/jobs/no-such-job").status_code == 404
        # run and wait: the result in the response
        r = c.post("/v1/signatures/qa:run", json={"inputs": {"question": "And the sea?"}})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "SUCCESS" and isinstance(r.json()["result"]["outputs"]["answer"], str)
        # the job's event stream ends with its result (more: test_gateway_live)
        events = c.get(f"/v1/jobs/{r.json()['id']}/events").text
        last = events.rstrip().splitlines()[-2:]
        assert last[0] == "event: result" and json.loads(last[1].removeprefix("data: "))["result"] == r.json()["result"]


def test_failed_job_is_a_problem_with_the_job_id(gw: Served, api_key: str) -> None:
    # a state the gateway refuses (demos not a list), stored behind its back through the library
    from dspex_tasks.dsl.signature import SignatureRegistry
    from dspex_tasks.programs.store import ProgramStore

    # (a store that knows no signature checks nothing: what an older client may have written)
    ProgramStore(redis=gw.app.state.gateway.client.redis, namespace=gw.settings.namespace,
                 signatures=SignatureRegistry()).put("fail1", "qa", {"demos": "x"}, signature="qa")
    with gw.client(api_key) as c:
        assert c.put("/v1/sessions/fail1/programs/qa", json={"state": {"demos": "x"}}).status_code == 422
        r = c.post("/v1/signatures/qa:run", json={"inputs": {"question": "q"}, "session": "fail1"})
        assert r.status_code == 422 and r.json()["job_id"] and r.json()["errors"][0]["field"].endswith("demos")
        job = c.get(f"/v1/jobs/{r.json()['job_id']}").json()
        assert job["state"] == "FAILURE" and job["error"]["code"] == "validation_error" and "result" not in job
        # a program that serves another signature: 409 before anything is enqueued
        c.put("/v1/sessions/fail1/programs/other", json={"state": {"demos": []}, "signature": "complex_analysis"})
        body = {"inputs": {"question": "q"}, "session": "fail1", "program": "other"}
        r = c.post("/v1/signatures/qa:run", json=body)
        assert r.status_code == 409 and r.json()["errors"][0]["field"] == "program"


def test_program_crud(gw: Served, api_key: str) -> None:
    base = "/v1/sessions/crud1/programs/qa"
    with gw.client(api_key) as c:
        assert c.get(base).status_code == 404
        assert c.put(base, json={"state": {"demos": []}, "signature": "qa"}).json()["version"] == 1
        assert c.put(base, json={"state": {"demos": [{"question": "q", "answer": "a"}]}}).json()["version"] == 2
        got = c.get(base).json()
        assert got["version"] == 2 and got["state"]["demos"][0]["answer"] == "a"
        assert c.get(base, params={"version": 1}).json()["state"] == {"demos": []}
        assert c.get(base + "/history").json()["versions"] == [1, 2]
        assert c.post(base + "/rollback", json={"version": 1}).json()["version"] == 1
        assert c.get(base).json()["version"] == 1
        assert c.get("/v1/sessions/crud1/programs").json() == {"items": ["qa"]}
        assert "crud1" in c.get("/v1/sessions").json()["items"]
        res = c.post("/v1/signatures/qa:run", json={"inputs": {"question": "q"}, "session": "crud1"}).json()
        assert res["result"]["program_version"] == 1
        assert c.delete(base).status_code == 204 and c.get(base).status_code == 404
        assert c.post(base + "/rollback", json={"version": 1}).status_code == 404
        assert c.delete("/v1/sessions/crud1").status_code == 204
        assert "crud1" not in c.get("/v1/sessions").json()["items"]


def test_openapi_has_real_schemas(gw: Served) -> None:
    with gw.client() as c:  # the document is public: generated clients need it
        doc = c.get("/openapi.json").json()
    comp = doc["components"]["schemas"]
    assert comp["qa.inputs"]["properties"]["question"]["type"] == "string"
    assert comp["qa.outputs"]["properties"]["confidence"] == {"type": "number", "minimum": 0, "maximum": 1}
    body = doc["paths"]["/v1/signatures/qa/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/qa.job_request"}
    assert comp["qa.job_request"]["properties"]["inputs"] == {"$ref": "#/components/schemas/qa.inputs"}
    assert comp["qa.result"]["properties"]["outputs"] == {"$ref": "#/components/schemas/qa.outputs"}
    entity = comp["complex_analysis.outputs"]["properties"]["entities"]["items"]
    assert entity["required"] == ["text", "type"]
    run = doc["paths"]["/v1/signatures/qa:run"]["post"]["responses"]
    assert run["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/qa.job"}
    assert run["422"]["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    optimize = doc["paths"]["/v1/optimizations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert optimize["discriminator"]["mapping"]["qa"] == "#/components/schemas/qa.optimization_request"
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_signatures_published_later_appear_without_restart(serve: Callable[..., Served], redis_module: Any,
                                                          gw_settings: Any) -> None:
    from dspex_tasks.dsl.signature import signature
    from dspex_tasks.worker.runtime import publish_signatures

    ns = f"{gw_settings.namespace}r"  # a namespace of its own: these signatures have no worker
    gw = serve(namespace=ns)
    raw, _ = KeyStore(redis=redis_module, namespace=ns).create("refresh")
    gateway = gw.app.state.gateway
    with gw.client(raw) as c:
        assert c.get("/v1/signatures").json() == {"signatures": {}}
        assert "/v1/signatures/translate/jobs" not in c.get("/openapi.json").json()["paths"]
        # a worker publishes a signature: the subscription alone brings it in (no request made meanwhile)
        new = signature("text: str, lang: literal['fr', 'de'] -> translation: str", name="translate",
                        register=False)
        publish_signatures(redis_module, ns, [new])
        deadline = time.monotonic() + 5
        while "translate" not in gateway.signatures:
            assert time.monotonic() < deadline, "not refreshed"
            time.sleep(0.02)
        assert "translate" in c.get("/v1/signatures").json()["signatures"]
        doc = c.get("/openapi.json").json()
        assert doc["components"]["schemas"]["translate.inputs"]["properties"]["lang"]["enum"] == ["fr", "de"]
        assert "/v1/signatures/translate:run" in doc["paths"]
        # and a request naming a signature the gateway has not heard of yet re-reads the published set
        redis_module.hset(keys.signatures(ns), "late", json.dumps(
            signature("a: str -> b: str", name="late", register=False).describe()))
        time.sleep(0.6)
        assert c.get("/v1/signatures/late").json()["name"] == "late"


def test_auth_off_serves_loopback_only(serve: Callable[..., Served]) -> None:
    gw = serve(gateway_auth=False)
    with gw.client() as c:
        assert c.get("/v1/signatures").status_code == 200


def test_no_redis_at_start_refuses_to_start_and_a_later_outage_is_503(gw_settings: Any) -> None:
    from dspex_tasks.client import Client
    from dspex_tasks.gateway.auth import KeyStore
    from dspex_tasks.testing.redis_server import RedisServer

    dead = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    s = gw_settings.model_copy(update={"redis_url": dead, "redis_wait_s": 0.2})
    from fastapi.testclient import TestClient

    with Client(settings=s) as client, pytest.raises(Exception, match="cannot reach Redis"), \
            TestClient(create_gateway(s, client=client)):  # the lifespan refuses to start
        pass
    with RedisServer() as server:
        s = gw_settings.model_copy(update={"redis_url": str(server.url)})
        raw, _ = KeyStore(redis=redis_client(s), namespace=s.namespace).create("outage")
        with Client(settings=s) as client:
            served = UvicornThread(create_gateway(s, client=client)).__enter__()
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{served.port}", timeout=30,
                                  headers={"Authorization": f"Bearer {raw}"}) as c:
                    assert c.get("/v1/signatures").status_code == 200
                    server.stop()
                    r = c.get("/v1/signatures")
                    assert r.status_code == 503 and r.headers["retry-after"] == "1"
                    assert r.json()["code"] == "unavailable"
            finally:
                served.__exit__(None, None, None)


def test_optimization_routes(gw: Served, api_key: str) -> None:
    from dspex_tasks.testing.mockgen import rule_answer

    rows = [{"question": f"q{i}", "answer": rule_answer({"question": f"q{i}"})} for i in range(4)]
    with gw.client(api_key) as c:
        r = c.post("/v1/optimizations", json={"signature": "qa", "trainset": rows, "session": "o1"})
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        assert r.headers["location"] == f"/v1/optimizations/{run_id}"
        assert c.get(f"/v1/optimizations/{run_id}").json()["signature"] == "qa"
        assert run_id in c.get("/v1/optimizations", params={"session": "o1"}).json()["items"]
        bad = c.post("/v1/optimizations", json={"signature": "qa", "trainset": [{"question": 1, "answer": "a"}]})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "trainset.0.question"
        assert c.get(f"/v1/optimizations/{'0' * 32}").status_code == 404
        assert c.get(f"/v1/optimizations/{'0' * 32}/events").status_code == 404
        assert c.post(f"/v1/optimizations/{run_id}/cancel").status_code == 202


def test_optimization_params_are_checked_and_a_dry_run_serves_its_candidate(gw: Served, api_key: str) -> None:
    from dspex_tasks.testing.mockgen import rule_answer

    rows = [{"question": f"c{i}", "answer": rule_answer({"question": f"c{i}"})} for i in range(8)]
    with gw.client(api_key) as c:
        # params the optimizer refuses: 422 naming the field, before anything runs
        bad = c.post("/v1/optimizations", json={"signature": "qa", "trainset": rows, "optimizer": "miprov2",
                                                "params": {"minibatch": False}})
        assert bad.status_code == 422, bad.text
        assert bad.json()["errors"][0]["field"] == "params.minibatch"
        assert bad.json()["errors"][0]["pointer"] == "/params/minibatch"
        assert "unknown param 'minibatch'" in bad.json()["errors"][0]["message"]
        # a run without a session: a dry run whose candidate is served once compiled
        r = c.post("/v1/optimizations", json={"signature": "qa", "trainset": rows, "params": {"eval_chunk_size": 4}})
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        deadline = time.monotonic() + 60
        while (rec := c.get(f"/v1/optimizations/{run_id}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, rec
            time.sleep(0.2)
        assert rec["summary"]["dry_run"] is True and rec["summary"]["promoted"] is False, rec
        cand = c.get(f"/v1/optimizations/{run_id}/candidate")
        assert cand.status_code == 200, cand.text
        body = cand.json()
        assert body["run_id"] == run_id and body["signature"] == "qa" and isinstance(body["state"], dict)
        put = c.put("/v1/sessions/cand1/programs/qa", json={"state": body["state"], "signature": "qa"})
        assert put.status_code == 200, put.text
        missing = c.get(f"/v1/optimizations/{'0' * 32}/candidate")
        assert missing.status_code == 404 and missing.json()["code"] == "run_not_found"


def test_openapi_contract_with_schemathesis(gw: Served, api_key: str, tmp_path: Any) -> None:
    """Schemathesis throws generated and malformed requests at every documented operation.

    All its phases (coverage: boundary and malformed values; fuzzing: positive and negative data; stateful:
    chains along the document's links) and all its checks: no 5xx, documented status codes, content types
    and headers, bodies (and SSE events) matching the response schemas, schema-invalid data rejected,
    schema-valid data accepted, auth enforced, deleted resources gone.
    """
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{gw.url}/openapi.json", "--checks", "all",
           "--max-examples", "10", "--request-timeout", "30", "-H", f"Authorization: Bearer {api_key}",
           "--report", "junit", "--report-dir", str(tmp_path)]
    # run in tmp_path: schemathesis keeps state (a crash cache) in its working directory
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "Tested: " in out.stdout


def test_trace_and_lm_config_body_fields(gw: Served, api_key: str) -> None:
    with gw.client(api_key) as c:
        # Given options from the allowlist, the job runs with them and its result carries the trace
        r = c.post("/v1/signatures/qa:run", json={"inputs": {"question": "Why?"}, "trace": True,
                                                  "lm_config": {"temperature": 0.3, "max_tokens": 50}})
        assert r.status_code == 200, r.text
        result = r.json()["result"]
        assert [call["predictor"] for call in result["trace"]] == ["self"]
        assert result["trace"][0]["outputs"]["answer"] == result["outputs"]["answer"]
        # A key outside the allowlist, or a bad value: 422 naming the body field, nothing enqueued
        r = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "Why?"}, "trace": "yes",
                                                   "lm_config": {"api_base": "http://attacker", "n": 0}})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        errs = {e["field"]: e for e in r.json()["errors"]}
        assert set(errs) == {"trace", "lm_config.api_base", "lm_config.n"}
        assert errs["lm_config.api_base"]["message"] == ("not allowed; allowed: max_tokens, n, rollout_id, "
                                                         "temperature, top_p")
        assert errs["lm_config.api_base"]["pointer"] == "/lm_config/api_base"
        assert "lm_config.api_base: not allowed" in r.json()["detail"]
        # documented: the request's options and the result's trace
        comp = c.get("/openapi.json").json()["components"]["schemas"]
    props = comp["qa.job_request"]["properties"]
    lm_config = props["lm_config"]["anyOf"][0]
    assert sorted(lm_config["properties"]) == ["max_tokens", "n", "rollout_id", "temperature", "top_p"]
    assert lm_config["additionalProperties"] is False and "trace" in props
    assert comp["qa.result"]["properties"]["trace"]["items"] == {"$ref": "#/components/schemas/TraceEntry"}
