"""Live execution (ARCHITECTURE 3.6): events, cancellation and timeout_s with a real Redis and an in-process
worker (the in-process MockLM, which does not stream: token events come from the final settle)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks import errors, keys
from dspex_tasks.dsl.signature import Signature, SignatureRegistry, parse_spec, signature
from tests._procs import celery_events
from tests.redis.test_request_options import TwoStep  # the same two-predictor program

pytestmark = pytest.mark.redis


@pytest.fixture
def signatures() -> SignatureRegistry:
    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str, confidence: confidence_score", name="qa", register=False))
    inputs, outputs = parse_spec("question: str -> answer: str")
    reg.add(Signature("two_step", inputs, outputs, instructions=None, module="program", desc=None, kind="program",
                      factory=TwoStep, origin=f"{TwoStep.__module__}:TwoStep"))
    return reg


@pytest.fixture
def slow_client(settings: Any, signatures: SignatureRegistry) -> Iterator[Any]:
    """A worker whose every LM call takes 400 ms, and a client."""
    from dspex_tasks.client import Client
    from dspex_tasks.testing.plugin import in_process_worker
    from dspex_tasks.worker.app import create_worker_app

    s = settings.model_copy(update={"mock_latency_ms": 400.0})
    app = create_worker_app(s, signatures=signatures, import_modules=False)
    with in_process_worker(app, concurrency=4):
        c = Client(settings=s)
        yield c
        c.close()


def _rebuild(events: list[dict[str, Any]], field: str) -> str:
    text = ""
    for e in events:
        if e["type"] == "token" and e["field"] == field:
            text = (e["chunk"] if e.get("reset") else text + e["chunk"])
    return text


def test_streamed_job_events_replay_steps_tokens_and_result(client: Any) -> None:
    job = client.submit("qa", {"question": "What is DSPy?"}, stream=True)
    events = list(job.events(timeout=20))
    res = job.get(timeout=5)
    types = [e["type"] for e in events]
    assert types[0] == "status" and events[0]["state"] == "running"
    assert types[-1] == "result"
    assert events[-1]["result"]["outputs"] == res.outputs
    steps = [(e["phase"], e["name"], e["kind"]) for e in events if e["type"] == "step"]
    assert ("start", "self", "predictor") in steps and ("end", "self", "predictor") in steps
    assert _rebuild(events, "answer") == res.outputs["answer"]
    assert all(e["id"] for e in events) and all(isinstance(e["ts"], float) for e in events)
    # a late follower replays everything, in the same order, with the same ids
    again = list(client.job(job.id).events(timeout=5))
    assert [e["id"] for e in again] == [e["id"] for e in events]
    # the stream is bounded in time
    ttl = client.redis.ttl(keys.job_events(client.settings.namespace, job.id))
    assert 0 < ttl <= client.settings.stream_ttl_s


def test_unstreamed_job_writes_no_stream_and_events_yield_only_its_result(client: Any) -> None:
    job = client.submit("qa", {"question": "Plain?"})
    res = job.get(timeout=20)
    assert not client.redis.exists(keys.job_events(client.settings.namespace, job.id))
    events = list(job.events(timeout=10))
    assert [e["type"] for e in events] == ["result"]
    assert events[0]["result"]["outputs"] == res.outputs


def test_events_iterate_asynchronously(client: Any) -> None:
    job = client.submit("qa", {"question": "Async?"}, stream=True)

    async def follow() -> list[dict[str, Any]]:
        return [e async for e in job.events(timeout=20)]

    events = asyncio.run(follow())
    assert events[-1]["type"] == "result"
    assert events[-1]["result"]["outputs"] == job.get(timeout=5).outputs


def test_cancel_a_queued_job_ends_it_cancelled_without_running(client: Any) -> None:
    job = client.submit("qa", {"question": "Later?"}, countdown=1.5, stream=True)
    assert job.cancel() is True
    with pytest.raises(errors.Cancelled, match="cancelled"):
        job.get(timeout=20)
    events = list(job.events(timeout=5))
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["error"]["type"] == "Cancelled"


def test_cancel_a_running_job_stops_it_before_its_next_lm_call(slow_client: Any) -> None:
    job = slow_client.submit("two_step", {"question": "Stop me?"}, stream=True)
    seen: list[dict[str, Any]] = []
    for event in job.events(timeout=20):
        seen.append(event)
        if event["type"] == "step" and event["phase"] == "start" and event["name"] == "draft.predict":
            assert job.cancel() is True
    with pytest.raises(errors.Cancelled):
        job.get(timeout=5)
    assert seen[-1]["type"] == "error", [(e["type"], e.get("phase"), e.get("name"), e.get("ts")) for e in seen]
    assert seen[-1]["error"]["type"] == "Cancelled"
    # it stopped at the draft's LM call or, if that call had begun, at the next one: polish never finished
    stopped = [e for e in seen if e["type"] == "step" and e["phase"] == "end" and "cancelled" in e.get("error", "")]
    assert stopped and stopped[0]["name"] in ("draft.predict", "polish")
    assert not [e for e in seen if e["type"] == "step" and e["phase"] == "end" and e["name"] == "polish"
                and "error" not in e]
    assert job.cancel() is False  # already finished


def test_timeout_s_bounds_a_jobs_total_time(slow_client: Any) -> None:
    t0 = time.monotonic()
    job = slow_client.submit("two_step", {"question": "Too slow?"}, timeout_s=0.2)
    with pytest.raises(errors.Cancelled, match="timeout_s=0.2"):
        job.get(timeout=20)
    assert time.monotonic() - t0 < 3.0
    # with room to finish it finishes
    assert slow_client.submit("two_step", {"question": "Fine?"}, timeout_s=30).get(timeout=20).outputs["answer"]


def test_bad_options_are_refused_before_enqueue(client: Any) -> None:
    with pytest.raises(errors.ValidationError, match="options.timeout_s"):
        client.submit("qa", {"question": "x"}, timeout_s=-1)
    with pytest.raises(errors.ValidationError, match="options.stream"):
        client.submit("qa", {"question": "x"}, stream="yes")  # type: ignore[arg-type]


def test_many_followers_see_the_same_events(client: Any) -> None:
    job = client.submit("qa", {"question": "Everyone?"}, stream=True)
    out: list[list[str]] = [[], [], []]

    def follow(i: int) -> None:
        out[i] = [e["id"] for e in client.job(job.id).events(timeout=20)]

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out[0] and out[0] == out[1] == out[2]


def test_a_streamed_jobs_steps_reach_flower_as_task_progress_events(client: Any) -> None:
    # Given a receiver of the worker's Celery events (all Flower reads)
    progress: list[dict[str, Any]] = []
    with celery_events(client.app, {"task-progress": progress.append}):
        # When a streamed two-predictor job runs
        job = client.submit("two_step", {"question": "Steps?"}, stream=True)
        job.get(timeout=20)
        deadline = time.monotonic() + 5  # the worker sends task events in batches every 100 ms
        while time.monotonic() < deadline and len({e.get("step") for e in progress if e["uuid"] == job.id}) < 2:
            time.sleep(0.05)
    # Then each predictor step is a task-progress event of that job, from the worker, with a readable result
    mine = [e for e in progress if e["uuid"] == job.id]
    assert len({e["step"] for e in mine}) >= 2, mine
    assert all(e["result"] == f"step: {e['step']}" and e["hostname"] for e in mine)
