"""Layer 2: run ids and Last-Event-ID headers at the gateway are refused with 422 before anything reaches Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dspex_tasks.gateway import create_gateway
from dspex_tasks.gateway.auth import KeyStore
from dspex_tasks.optimize.runs import RunStore
from tests.redis.test_gateway import UvicornThread

pytestmark = pytest.mark.redis


@pytest.fixture
def served(settings: Any, redis_client: Any) -> Iterator[tuple[httpx.Client, RunStore]]:
    """A gateway (no worker: these routes only read Redis), an API key, and the run store behind it."""
    from dspex_tasks.client import Client

    client = Client(settings=settings)
    # admin: the runs here are dry runs made outside the gateway, which only admin keys see
    raw, _ = KeyStore(redis=redis_client, namespace=settings.namespace).create("ids", rights=["admin"])
    with UvicornThread(create_gateway(settings, client=client)) as server, httpx.Client(
            base_url=f"http://127.0.0.1:{server.port}", headers={"Authorization": f"Bearer {raw}"}, timeout=30) as http:
        yield http, RunStore(redis=redis_client, namespace=settings.namespace)
    client.close()


def _run(store: RunStore) -> str:
    run_id = store.create({"signature": "qa", "program": "qa", "optimizer": "bootstrap_few_shot",
                           "metric": "exact_match"})
    store.emit(run_id, {"stage": "queued", "done": 0, "total": None})
    store.emit(run_id, {"stage": "done", "done": 1, "total": 1})
    return run_id


def test_a_run_id_reaching_other_keys_is_422_on_every_run_route(served: tuple[httpx.Client, RunStore]) -> None:
    http, store = served
    run_id = _run(store)
    store.save_checkpoint(run_id, "data", {"x": 1})  # a string key: HGETALL on it was WRONGTYPE, a 500
    assert http.get(f"/v1/optimizations/{run_id}").status_code == 200
    for bad in (f"{run_id}:ckpt:data", f"{run_id}:events", "r1", run_id.upper(), run_id + "0"):
        for method, path in (("GET", ""), ("GET", "/candidate"), ("POST", "/cancel"), ("GET", "/events")):
            r = http.request(method, f"/v1/optimizations/{bad}{path}")
            assert r.status_code == 422, (bad, path, r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json"
    assert http.get(f"/v1/optimizations/{uuid.uuid4().hex}").status_code == 404  # well-formed, unknown
    assert http.get("/healthz").status_code == 200  # the same connection still serves


def test_a_malformed_last_event_id_is_422_before_the_stream_starts(served: tuple[httpx.Client, RunStore]) -> None:
    http, store = served
    run_id = _run(store)
    url = f"/v1/optimizations/{run_id}/events"
    full = http.get(url)
    assert full.status_code == 200 and full.text.count("data: ") == 2
    first = next(line[4:] for line in full.text.splitlines() if line.startswith("id: "))
    resumed = http.get(url, headers={"Last-Event-ID": first})
    assert resumed.status_code == 200 and resumed.text.count("data: ") == 1 and '"stage":"done"' in resumed.text
    assert http.get(url, headers={"Last-Event-ID": ""}).text.count("data: ") == 2  # empty: from the start
    for header in (f"{2**64}-0", "99999999999999999999-0", "abc", "1-2-3", "5"):
        r = http.get(url, headers={"Last-Event-ID": header})
        assert r.status_code == 422, (header, r.status_code, r.text)
        body = r.json()
        assert body["code"] == "validation_error" and body["errors"][0]["pointer"] == "header:last-event-id"
