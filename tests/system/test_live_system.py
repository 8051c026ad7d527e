"""Layer 3: live execution on a real worker process through dspy -> the HTTP mock LM's streamed responses.

Token events come from DSPy's own streaming (``dspy.streamify`` with listeners on the interface's text
outputs) over the mock's ``stream: true`` chunks; step and tool events from DSPy's callbacks; cancellation and
``timeout_s`` are checked before every LM call, so the LM sees no request after the stop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks import errors, keys
from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from tests._procs import WorkerProcess, wait_for

pytestmark = pytest.mark.system

NS = "livesys"


@pytest.fixture(scope="module")
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live(redis_base_url: str, mock_lm: MockLMServer, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Client]:
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_PREDICT_QUEUE": f"{NS}.predict", "DSPEX_STREAM_TTL_S": "120"}
    w = WorkerProcess(redis_base_url, NS, queues=f"{NS}.predict", concurrency=8, env=env, name=NS,
                      log_dir=tmp_path_factory.mktemp(NS))
    from dspex_tasks.settings import Settings

    client = Client(settings=Settings(redis_url=redis_base_url, namespace=NS, predict_queue=f"{NS}.predict"))
    try:
        w.wait_ready(timeout_s=60)
        wait_for(lambda: "agent" in client.signatures(refresh=True), what="programs published")
        yield client
    finally:
        client.close()
        w.stop()


@pytest.fixture(autouse=True)
def _reset_knobs(mock_lm: MockLMServer) -> Iterator[None]:
    yield
    mock_lm.control(latency_ms=0, chunk_latency_ms=0, stream_error_after=None)


def _rebuild(events: list[dict[str, Any]], field: str) -> str:
    text = ""
    for e in events:
        if e["type"] == "token" and e["field"] == field:
            text = e["chunk"] if e.get("reset") else text + e["chunk"]
    return text


def test_token_events_rebuild_the_output_from_real_streamed_chunks(live: Client, mock_lm: MockLMServer) -> None:
    mock_lm.control(chunk_latency_ms=20)
    job = live.submit("qa", {"question": "What do the stream chunks spell?"}, stream=True)
    events = list(job.events(timeout=30))
    res = job.get(timeout=5)
    tokens = [e for e in events if e["type"] == "token" and e["field"] == "answer"]
    assert len(tokens) > 1, events  # streamed, not one settled chunk
    assert _rebuild(events, "answer") == res.outputs["answer"]
    assert events[-1]["type"] == "result" and events[-1]["result"]["outputs"] == res.outputs
    # the tokens arrived while the LM was still answering, before the step ended
    end = next(i for i, e in enumerate(events) if e["type"] == "step" and e["phase"] == "end")
    assert events.index(tokens[0]) < end
    assert any(r.get("stream") for r in mock_lm.request_log())


def test_a_react_agent_emits_its_tool_calls(live: Client) -> None:
    job = live.submit("agent", {"question": "When was the Veshan lighthouse built?"}, stream=True)
    events = list(job.events(timeout=60))
    res = job.get(timeout=5)
    tools = [e for e in events if e["type"] == "tool"]
    starts = [e for e in tools if e["phase"] == "start"]
    ends = [e for e in tools if e["phase"] == "end"]
    assert starts and len(starts) == len(ends)
    known = {"search_veshan", "lookup_veshan", "years_between", "day_of_week"}
    assert {e["name"] for e in starts} <= known
    assert all(isinstance(e["arguments"], dict) for e in starts)
    assert all("result" in e or "error" in e for e in ends)
    steps = {e["name"] for e in events if e["type"] == "step"}
    assert {"react", "extract.predict"} <= steps
    assert _rebuild(events, "answer") == res.outputs["answer"]


def test_a_late_follower_replays_everything(live: Client) -> None:
    job = live.submit("qa", {"question": "Replay?"}, stream=True)
    first = list(job.events(timeout=30))
    late = list(live.job(job.id).events(timeout=5))
    assert late == first
    resumed = list(live.job(job.id).events(after=first[2]["id"], timeout=5))
    assert resumed == first[3:]


def test_cancel_stops_a_running_multi_call_job_and_the_lm_sees_no_further_request(
        live: Client, mock_lm: MockLMServer) -> None:
    mock_lm.control(latency_ms=600)
    job = live.submit("agent", {"question": "Which island has the oldest harbour?"}, stream=True)
    for event in job.events(timeout=30):
        if event["type"] == "step" and event["phase"] == "start" and event["kind"] == "predictor":
            break
    time.sleep(0.2)  # the first LM call is in flight
    seen = mock_lm.stats()["requests"]
    t0 = time.monotonic()
    assert job.cancel("enough")
    with pytest.raises(errors.Cancelled, match="enough"):
        job.get(timeout=10)
    # it ended after the call in flight (<= 0.6 s), at its next LM call
    assert time.monotonic() - t0 < 1.6
    time.sleep(0.3)
    assert mock_lm.stats()["requests"] == seen


def test_timeout_s_stops_a_job_at_its_next_lm_call(live: Client, mock_lm: MockLMServer) -> None:
    mock_lm.control(latency_ms=400)
    before = mock_lm.stats()["requests"]
    job = live.submit("agent", {"question": "How far is the north cape?"}, timeout_s=1.0)
    with pytest.raises(errors.Cancelled, match="timeout_s=1"):
        job.get(timeout=15)
    calls = mock_lm.stats()["requests"] - before
    assert 1 <= calls <= 4  # ~1 s of 0.4 s calls, then no more


def test_a_stream_nobody_follows_expires(live: Client) -> None:
    job = live.submit("qa", {"question": "Anyone?"}, stream=True)
    job.get(timeout=30)
    key = keys.job_events(NS, job.id)
    ttl = live.redis.ttl(key)
    assert 0 < ttl <= 120  # DSPEX_STREAM_TTL_S on the worker
    assert live.redis.xlen(key) >= 3


def test_a_running_streamed_job_shows_its_step_as_progress(live: Client, mock_lm: MockLMServer) -> None:
    mock_lm.control(latency_ms=400)
    job = live.submit("agent", {"question": "Where is the Veshan archive?"}, stream=True)
    seen: list[Any] = []
    deadline = time.monotonic() + 30
    while not job.ready() and time.monotonic() < deadline:
        state = job.state
        if state == "PROGRESS":
            seen.append(job.info)
        time.sleep(0.05)
    job.get(timeout=30)
    assert seen, "no PROGRESS state seen while the agent ran"
    assert all(isinstance(m, dict) and m["job"] == job.id for m in seen)
    assert {m["step"] for m in seen} <= {"react", "extract.predict"} and "react" in {m["step"] for m in seen}
    assert job.state == "SUCCESS"
