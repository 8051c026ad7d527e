"""Layer 2: the HTTP gateway on a real uvicorn server (in a thread), a real Redis and an in-process worker."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from dspex_tasks import keys
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


@pytest.fixture
def serve(worker_app: Any, settings: Any) -> Iterator[Callable[..., Served]]:
    """Start a gateway with settings overrides; all are stopped at the end of the test."""
    from dspex_tasks.client import Client

    started: list[tuple[UvicornThread, Client]] = []

    def start(**overrides: Any) -> Served:
        s = settings.model_copy(update={"gateway_rate_per_min": 100_000, **overrides})
        client = Client(settings=s)
        app = create_gateway(s, client=client)
        server = UvicornThread(app).__enter__()
        started.append((server, client))
        return Served(f"http://127.0.0.1:{server.port}", app, s)

    yield start
    for server, client in reversed(started):
        server.__exit__()
        client.close()


@pytest.fixture
def key_store(redis_client: Any, settings: Any) -> KeyStore:
    return KeyStore(redis=redis_client, namespace=settings.namespace)


@pytest.fixture
def api_key(key_store: KeyStore) -> str:
    raw, _ = key_store.create("tests")
    return raw


@pytest.fixture
def gw(serve: Callable[..., Served]) -> Served:
    return serve()


def test_auth_is_required_and_keys_are_stored_hashed(gw: Served, key_store: KeyStore, redis_client: Any) -> None:
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
    stored = redis_client.hgetall(keys.gateway_api_keys(gw.settings.namespace))
    assert raw.encode() not in b"".join([*stored, *stored.values()])  # the raw key is never stored
    assert hash_key(raw).encode() in stored and json.loads(stored[hash_key(raw).encode()])["name"] == "svc-a"
    with gw.client(raw) as c:
        assert c.get("/v1/signatures").status_code == 200
        assert c.get("/v1/signatures", headers={"Authorization": "", "X-API-Key": raw}).status_code == 200
    assert [k.id for k in key_store.revoke("svc-a")] == [record.id]
    with gw.client(raw) as c:
        assert c.get("/v1/signatures").status_code == 401


def test_rate_limit_answers_429_with_retry_after(serve: Callable[..., Served], api_key: str,
                                                 key_store: KeyStore) -> None:
    gw = serve(gateway_rate_per_min=5)
    with gw.client(api_key) as c:
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
        # the job's event stream ends with 'done' and the result
        events = c.get(f"/v1/jobs/{r.json()['id']}/events").text
        done = "data: " + json.dumps(r.json(), separators=(",", ":"))
        assert events.rstrip().splitlines()[-2:] == ["event: done", done]


def test_program_crud(gw: Served, api_key: str) -> None:
    base = "/v1/sessions/t42/programs/qa"
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
        assert c.get("/v1/sessions/t42/programs").json() == {"items": ["qa"]}
        assert "t42" in c.get("/v1/sessions").json()["items"]
        res = c.post("/v1/signatures/qa:run", json={"inputs": {"question": "q"}, "session": "t42"}).json()
        assert res["result"]["program_version"] == 1
        assert c.delete(base).status_code == 204 and c.get(base).status_code == 404
        assert c.post(base + "/rollback", json={"version": 1}).status_code == 404
        assert c.delete("/v1/sessions/t42").status_code == 204
        assert "t42" not in c.get("/v1/sessions").json()["items"]


def test_openapi_has_real_schemas_and_refreshes_on_publish(gw: Served, api_key: str, redis_client: Any) -> None:
    from dspex_tasks.runtime import publish_signatures
    from dspex_tasks.signature import signature

    with gw.client(api_key) as c:
        doc = c.get("/openapi.json").json()
        comp = doc["components"]["schemas"]
        assert comp["qa.inputs"]["properties"]["question"]["type"] == "string"
        assert comp["qa.outputs"]["properties"]["confidence"] == {"type": "number", "minimum": 0, "maximum": 1}
        body = doc["paths"]["/v1/signatures/qa/jobs"]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/qa.job_request"}
        assert comp["qa.job_request"]["properties"]["inputs"] == {"$ref": "#/components/schemas/qa.inputs"}
        assert comp["qa.result"]["properties"]["outputs"] == {"$ref": "#/components/schemas/qa.outputs"}
        assert "/v1/signatures/translate/jobs" not in doc["paths"]
        # a worker publishes a new signature: it appears without a restart
        new = signature("text: str, lang: literal['fr', 'de'] -> translation: str", name="translate", register=False)
        publish_signatures(redis_client, gw.settings.namespace, [new])
        deadline = time.monotonic() + 5
        while "translate" not in c.get("/v1/signatures").json()["signatures"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        doc = c.get("/openapi.json").json()
        assert doc["components"]["schemas"]["translate.inputs"]["properties"]["lang"]["enum"] == ["fr", "de"]
        assert "/v1/signatures/translate:run" in doc["paths"]


def test_refresh_arrives_by_pubsub_alone(gw: Served, api_key: str, redis_client: Any) -> None:
    from dspex_tasks.runtime import publish_signatures
    from dspex_tasks.signature import signature

    gateway = gw.app.state.gateway
    before = gateway.version
    publish_signatures(redis_client, gw.settings.namespace,
                       [signature("a: str -> b: str", name="echo_later", register=False)])
    deadline = time.monotonic() + 5
    while "echo_later" not in gateway.signatures:  # no request made: the subscription did it
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert gateway.version > before


def test_auth_off_serves_loopback_only(serve: Callable[..., Served]) -> None:
    gw = serve(gateway_auth=False)
    with gw.client() as c:
        assert c.get("/v1/signatures").status_code == 200


def test_optimization_routes(gw: Served, api_key: str) -> None:
    from dspex_tasks.mockgen import rule_answer

    rows = [{"question": f"q{i}", "answer": rule_answer({"question": f"q{i}"})} for i in range(4)]
    with gw.client(api_key) as c:
        r = c.post("/v1/optimizations", json={"signature": "qa", "trainset": rows, "session": "o1"})
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        assert r.headers["location"] == f"/v1/optimizations/{run_id}"
        assert c.get(f"/v1/optimizations/{run_id}").json()["status"] == "queued"
        assert run_id in c.get("/v1/optimizations", params={"session": "o1"}).json()["items"]
        bad = c.post("/v1/optimizations", json={"signature": "qa", "trainset": [{"question": 1, "answer": "a"}]})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "trainset.0.question"
        assert c.get("/v1/optimizations/nope").status_code == 404
        assert c.get("/v1/optimizations/nope/events").status_code == 404
        assert c.post(f"/v1/optimizations/{run_id}/cancel").status_code == 202


# -- schemathesis: generated and malformed requests at every documented operation ----------------------------
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


@pytest.fixture
def gateway_schema(serve: Callable[..., Served], api_key: str, request: pytest.FixtureRequest) -> Any:
    gw = serve()
    request.node.gateway_key = api_key
    return schemathesis.openapi.from_url(gw.url + "/openapi.json")


api_schema = schemathesis.pytest.from_fixture("gateway_schema")


@api_schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_contract(case: Any, api_key: str) -> None:
    # every default check: no 5xx, documented status codes, content types and headers, bodies that match the
    # response schema, negative data rejected, auth enforced
    case.call_and_validate(headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
