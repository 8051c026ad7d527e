"""Layer 2: a job's live events as Server-Sent Events at the gateway, resuming with Last-Event-ID, and cancelling
a job over HTTP (a real uvicorn server in a thread, a real Redis, an in-process worker with the mock LM).

The fixtures are ``test_gateway``'s, instantiated anew for this module (its own namespace, worker and gateway).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from dspex_tasks.gateway import sse
from dspex_tasks.gateway.auth import KeyStore
from tests.redis import test_gateway as shared
from tests.redis.test_gateway import Served

gw_settings, gw_worker, redis_module = shared.gw_settings, shared.gw_worker, shared.redis_module
_started, serve, gw, key_store, api_key = shared._started, shared.serve, shared.gw, shared.key_store, shared.api_key

pytestmark = pytest.mark.redis

FINAL = ("result", "error")


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The frames of an SSE body: ``{"id"?, "event"?, "data"?}`` (data decoded), or ``{"comment"}``."""
    frames: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        frame: dict[str, Any] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                frame["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                frame[name] = json.loads(value) if name == "data" else value
        frames.append(frame)
    return frames


def events_of(c: httpx.Client, job_id: str, **headers: str) -> list[dict[str, Any]]:
    """The event frames (comments left out) of a job's stream, read to its end."""
    r = c.get(f"/v1/jobs/{job_id}/events", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return [f for f in parse_sse(r.text) if "data" in f]


def finished_view(c: httpx.Client, job_id: str) -> dict[str, Any]:
    """GET /v1/jobs/{id} once the job is ready (a streamed job's last event may come before its stored result)."""
    deadline = time.monotonic() + 20
    while (view := c.get(f"/v1/jobs/{job_id}").json())["state"] not in ("SUCCESS", "FAILURE"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    return dict(view)


def queued(gw: Served, key_id: str, *, countdown: float, **options: Any) -> str:
    """A job queued for ``countdown`` seconds, recorded as the key's as the gateway records its own submits (the
    gateway takes no countdown; a queued job it has no record of is unknown to it: no result is stored yet)."""
    from dspex_tasks.connections import async_redis_client
    from dspex_tasks.gateway.results import Hub, JobReader

    client = gw.app.state.gateway.client
    job = client.submit("qa", {"question": "Later?"}, countdown=countdown, **options)

    async def record() -> None:
        aredis = async_redis_client(gw.settings)
        try:
            await JobReader(celery_app=client.app, aredis=aredis, hub=Hub(aredis), namespace=gw.settings.namespace,
                            record_ttl_s=600).record(job.id, "qa", key_id)
        finally:
            await aredis.aclose()

    asyncio.run(record())
    return job.id


def submit(c: httpx.Client, **body: Any) -> str:
    r = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "What is DSPy?"}, **body})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_a_streamed_job_is_served_as_sse_frames_ending_with_its_result(gw: Served, api_key: str) -> None:
    with gw.client(api_key) as c:
        # Given a job submitted through the gateway with stream and timeout_s (top-level body fields)
        job = submit(c, stream=True, timeout_s=5)
        # When its events are followed
        frames = events_of(c, job)
        view = finished_view(c, job)
    # Then each frame is one event: its stream entry id, its type as the event name, the event as data
    assert [f["event"] for f in frames][0] == "status" and frames[0]["data"]["state"] == "running"
    for f in frames:
        assert f["id"] and f["id"] == f["data"]["id"] and f["event"] == f["data"]["type"], f
    ids = [tuple(map(int, f["id"].split("-"))) for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {"step", "token"} <= {f["event"] for f in frames}
    # and the stream ends with the result, the very one GET /v1/jobs/{id} shows
    assert frames[-1]["event"] == "result" and [f["event"] for f in frames].count("result") == 1
    assert view["state"] == "SUCCESS" and frames[-1]["data"]["result"] == view["result"]
    answer = "".join(f["data"]["chunk"] for f in frames if f["event"] == "token" and f["data"]["field"] == "answer")
    assert answer == view["result"]["outputs"]["answer"]


def test_bad_stream_options_are_422_naming_the_field(gw: Served, api_key: str) -> None:
    with gw.client(api_key) as c:
        r = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "q"}, "stream": "yes", "timeout_s": 0})
    assert r.status_code == 422, r.text
    assert {e["field"] for e in r.json()["errors"]} == {"stream", "timeout_s"}


def test_last_event_id_resumes_after_that_event(gw: Served, api_key: str) -> None:
    with gw.client(api_key) as c:
        job = submit(c, stream=True)
        frames = events_of(c, job)
        assert len(frames) >= 4
        # Given a client that saw the events up to one in the middle, when it reconnects with Last-Event-ID
        middle = len(frames) // 2
        resumed = events_of(c, job, **{"Last-Event-ID": frames[middle]["id"]})
        # Then it gets exactly the events after it; an empty header starts over
        assert resumed == frames[middle + 1:]
        assert events_of(c, job, **{"Last-Event-ID": ""}) == frames


@pytest.mark.parametrize("bad", ["abc", "1-2-3", "-1-0", f"{2**64}-0"])
def test_a_malformed_last_event_id_is_a_422_problem(gw: Served, api_key: str, bad: str) -> None:
    with gw.client(api_key) as c:
        job = submit(c)
        r = c.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": bad})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["pointer"] == "header:last-event-id"


def test_an_unstreamed_job_reports_its_states_then_ends_with_its_stored_result(
        gw: Served, key_store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE_S", 0.3)  # the gateway runs in this process
    raw, key = key_store.create("live-plain")
    with gw.client(raw) as c:
        # Given a job without stream, queued for a moment
        job = queued(gw, key.id, countdown=1.5)
        t0 = time.monotonic()
        frames = parse_sse(c.get(f"/v1/jobs/{job}/events").text)
        view = c.get(f"/v1/jobs/{job}").json()
        # Then, while it waits: its Celery state and keepalive comments; last its result from the stored result
        assert time.monotonic() - t0 < 10
        events = [f for f in frames if "data" in f]
        assert events[0]["event"] == "state" and events[0]["data"]["state"] == "PENDING" and "id" not in events[0]
        assert {"comment": "keepalive"} in frames
        assert events[-1]["event"] == "result" and "id" not in events[-1] and events[-1]["data"]["id"] is None
        assert events[-1]["data"]["result"] == view["result"]
        # and a job that has already ended answers its result at once
        done = c.post("/v1/signatures/qa:run", json={"inputs": {"question": "Done?"}}).json()
        t0 = time.monotonic()
        frames = events_of(c, done["id"])
        assert time.monotonic() - t0 < 0.9
        assert [f["event"] for f in frames] == ["result"] and frames[0]["data"]["result"] == done["result"]


def test_cancel_a_queued_job_ends_it_cancelled(gw: Served, key_store: KeyStore) -> None:
    raw, key = key_store.create("live-cancel")  # read, write on @default
    with gw.client(raw) as c:
        # Given a queued job of this key
        job = queued(gw, key.id, countdown=2, stream=True)
        # When it is cancelled over HTTP
        r = c.post(f"/v1/jobs/{job}/cancel")
        assert r.status_code == 202 and r.json() == {"id": job, "cancelled": True}
        # Then it ends as Cancelled, without running: its events end with the error, as GET shows it
        frames = events_of(c, job)
        view = finished_view(c, job)
        assert view["state"] == "FAILURE" and view["error"]["code"] == "cancelled"
        assert frames[-1]["event"] == "error" and frames[-1]["data"]["error"] == view["error"]
        assert "through the gateway" in view["error"]["message"]
        assert not [f for f in frames if f["event"] in ("step", "token")]
        # and cancelling it again says it had already finished
        assert c.post(f"/v1/jobs/{job}/cancel").json() == {"id": job, "cancelled": False}


def test_cancel_needs_the_write_right_on_the_keys_own_job(gw: Served, key_store: KeyStore) -> None:
    owner, _ = key_store.create("live-owner")  # read, write on @default
    other, _ = key_store.create("live-other")
    reader, _ = key_store.create("live-reader", rights=["read"], sessions=["*"])
    with gw.client(owner) as c:
        job = submit(c)
        finished_view(c, job)
        assert c.post(f"/v1/jobs/{job}/cancel").json() == {"id": job, "cancelled": False}
    with gw.client(reader) as c:  # no write right: 403 naming it, before the job is looked up
        r = c.post(f"/v1/jobs/{job}/cancel")
        assert r.status_code == 403 and r.json()["right"] == "write", r.text
    with gw.client(other) as c:  # another key's job: 404, as an unknown one
        r = c.post(f"/v1/jobs/{job}/cancel")
        assert r.status_code == 404 and r.json()["code"] == "job_not_found"


def test_the_openapi_document_describes_live_events_and_cancel(gw: Served) -> None:
    with gw.client() as c:
        doc = c.get("/openapi.json").json()
    events = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]
    assert "Last-Event-ID" in events["responses"]["200"]["description"]
    schema = events["responses"]["200"]["content"]["text/event-stream"]["itemSchema"]  # one event: no "schema"
    assert {"token", "result", "error"} <= set(schema["properties"]["event"]["enum"])
    cancel = doc["paths"]["/v1/jobs/{job_id}/cancel"]["post"]
    assert cancel["x-dspex-right"] == "write" and "202" in cancel["responses"]
    request = doc["components"]["schemas"]["qa.job_request"]["properties"]
    assert {"stream", "timeout_s"} <= set(request)
    # a submit's links lead to both operations
    links = doc["paths"]["/v1/signatures/qa/jobs"]["post"]["responses"]["202"]["links"]
    assert (links["events"]["operationId"], links["cancel"]["operationId"]) == (events["operationId"],
                                                                             cancel["operationId"])
