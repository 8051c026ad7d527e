"""The mock LM server's streamed answers (``"stream": true``), over real HTTP on loopback and through DSPy."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import dspy
import httpx
import pytest
from dspy.utils.exceptions import LMServerError

from dspex_tasks.testing.mock_server import MockLMServer

pytestmark = pytest.mark.unit

#: A DSPy-formatted prompt whose answer has field markers and more than ten words.
SIGNATURE = "question -> answer, notes: list[str], summary, reasoning_steps: list[str]"


@pytest.fixture(scope="module")
def server() -> Iterator[MockLMServer]:
    with MockLMServer(port=0, import_modules=False) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(server: MockLMServer) -> Iterator[None]:
    server.control(latency_ms=0, error_rate=0, status=500, fail_next=0, retry_after_s=1, chunk_latency_ms=0,
                   stream_chunk_chars=0, stream_error_after=None, reset_stats=True)
    yield


@pytest.fixture(scope="module")
def messages() -> list[dict[str, Any]]:
    sig = dspy.Predict(SIGNATURE).signature
    return list(dspy.ChatAdapter().format(sig, demos=[], inputs={"question": "Who wrote the first program?"}))


def _body(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": messages, **extra}


def _completion(server: MockLMServer, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(server.url + "/chat/completions", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _stream(server: MockLMServer, body: dict[str, Any]) -> tuple[httpx.Response, list[tuple[float, str]]]:
    """POST a streamed request; returns the response and each SSE ``data`` with its arrival (perf_counter)."""
    events: list[tuple[float, str]] = []
    with httpx.Client(timeout=10) as client, client.stream("POST", server.url + "/chat/completions",
                                                           json={**body, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append((time.perf_counter(), line.removeprefix("data: ")))
            else:
                assert line == "", line  # nothing but data lines and the blank line after each event
    return resp, events


def _content_chunks(events: list[tuple[float, str]]) -> list[dict[str, Any]]:
    out = []
    for _, data in events:
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
            out.append(chunk)
    return out


def test_stream_is_the_non_streamed_answer_in_chunks(server: MockLMServer, messages: list[dict[str, Any]]) -> None:
    whole = _completion(server, _body(messages))
    content = whole["choices"][0]["message"]["content"]
    assert "[[ ## answer ## ]]" in content

    resp, events = _stream(server, _body(messages, stream_options={"include_usage": True}))
    assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream"
    assert resp.headers.get("transfer-encoding") == "chunked" and "content-length" not in resp.headers
    assert events[-1][1] == "[DONE]" and [d for _, d in events].count("[DONE]") == 1
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and {c["model"] for c in chunks} == {"mock"}
    assert all(isinstance(c["created"], int) for c in chunks)

    content_chunks = _content_chunks(events)
    deltas = [c["choices"][0]["delta"] for c in content_chunks]
    assert {d["role"] for d in deltas} == {"assistant"}
    parts = [d["content"] for d in deltas]
    assert "".join(parts) == content  # byte for byte the non-streamed answer
    assert parts == re.findall(r"\S+\s*", content) and len(parts) > 10  # one word (and its whitespace) each
    assert "[[ " in parts and "answer " in parts  # the field markers are split like any text

    finish, usage = chunks[len(content_chunks)], chunks[-1]
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert len(chunks) == len(content_chunks) + 2

    # without stream_options.include_usage: no usage chunk
    _, plain = _stream(server, _body(messages))
    assert plain[-1][1] == "[DONE]" and all("usage" not in json.loads(d) for _, d in plain[:-1])
    assert "".join(c["choices"][0]["delta"]["content"] for c in _content_chunks(plain)) == content

    log = server.request_log()
    assert [e["stream"] for e in log] == [False, True, True] and [e["status"] for e in log] == [200] * 3
    assert log[1]["params"]["stream"] is True and "stream_error" not in log[1]
    assert server.stats() == {"requests": 3, "errors": 0, "in_flight": 0, "max_in_flight": 1}


def test_stream_chunk_chars(server: MockLMServer, messages: list[dict[str, Any]]) -> None:
    content = _completion(server, _body(messages))["choices"][0]["message"]["content"]
    assert server.control(stream_chunk_chars=7)["stream_chunk_chars"] == 7
    _, events = _stream(server, _body(messages))
    parts = [c["choices"][0]["delta"]["content"] for c in _content_chunks(events)]
    assert "".join(parts) == content
    assert all(len(p) == 7 for p in parts[:-1]) and 0 < len(parts[-1]) <= 7


def test_chunk_latency_spaces_the_chunks(server: MockLMServer, messages: list[dict[str, Any]]) -> None:
    latency = 0.03
    server.control(chunk_latency_ms=latency * 1000)
    start = time.perf_counter()
    _, events = _stream(server, _body(messages))
    elapsed = time.perf_counter() - start
    chunks = _content_chunks(events)
    n = len(chunks)
    assert n >= 10
    assert elapsed >= (n - 1) * latency * 0.95
    first, last = events[0][0], events[n - 1][0]
    assert last - first >= (n - 1) * latency * 0.95  # spread over the stream, not sent at the end in one go
    server.control(chunk_latency_ms=0)
    start = time.perf_counter()
    _stream(server, _body(messages))
    assert time.perf_counter() - start < (n - 1) * latency / 2


def test_latency_is_time_to_first_chunk(server: MockLMServer, messages: list[dict[str, Any]]) -> None:
    server.control(latency_ms=250)
    start = time.perf_counter()
    _, events = _stream(server, _body(messages))
    assert events[0][0] - start >= 0.25
    assert events[-1][0] - events[0][0] < 0.2  # no per-chunk delay unless chunk_latency_ms asks


def test_injected_errors_fail_before_the_stream(server: MockLMServer, messages: list[dict[str, Any]]) -> None:
    server.control(fail_next=1, status=429, retry_after_s=3)
    resp = httpx.post(server.url + "/chat/completions", json=_body(messages, stream=True), timeout=10)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "3"
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["type"] == "rate_limit_exceeded"
    server.control(error_rate=1.0, status=503)
    resp = httpx.post(server.url + "/chat/completions", json=_body(messages, stream=True), timeout=10)
    assert resp.status_code == 503 and "injected" in resp.json()["error"]["message"]
    assert [(e["status"], e["stream"]) for e in server.request_log()] == [(429, True), (503, True)]
    assert server.stats()["errors"] == 2


def test_stream_error_after_breaks_the_stream_off(server: MockLMServer, messages: list[dict[str, Any]]) -> None:
    assert server.control(stream_error_after=3)["stream_error_after"] == 3
    seen: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError), httpx.Client(timeout=10) as client, \
            client.stream("POST", server.url + "/chat/completions", json=_body(messages, stream=True)) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line:
                seen.append(line.removeprefix("data: "))
    assert len(seen) == 4 and "[DONE]" not in seen
    assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in seen[:3])
    error = json.loads(seen[3])["error"]
    assert error["type"] == "server_error" and "stream error" in error["message"]
    entry = server.request_log()[-1]
    assert entry["stream"] is True and entry["stream_error"] is True and entry["status"] == 200
    stats = server.stats()
    assert stats["requests"] == 1 and stats["errors"] == 1 and stats["in_flight"] == 0
    # 0 (or None) turns it off again, and the server still serves
    assert server.control(stream_error_after=0)["stream_error_after"] is None
    assert _stream(server, _body(messages))[1][-1][1] == "[DONE]"


def test_short_answer_still_breaks_off(server: MockLMServer) -> None:
    """An answer with fewer chunks than ``stream_error_after`` breaks off after its last one (no finish chunk)."""
    server.control(stream_error_after=1000)
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError), httpx.Client(timeout=10) as client, \
            client.stream("POST", server.url + "/chat/completions",
                          json=_body([{"role": "user", "content": "hi"}], stream=True)) as resp:
        lines.extend(line for line in resp.iter_lines() if line)
    assert len(lines) > 1 and "error" in json.loads(lines[-1].removeprefix("data: "))
    assert all(json.loads(d.removeprefix("data: "))["choices"][0]["finish_reason"] is None for d in lines[:-1])


def test_keep_alive_after_a_stream(server: MockLMServer, messages: list[dict[str, Any]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps(_body(messages, stream=True))
    try:
        for _ in range(2):
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and not resp.will_close and resp.getheader("Content-Length") is None
            assert resp.read().endswith(b"data: [DONE]\n\n")
        sock = conn.sock
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        assert conn.sock is sock  # the chunked body ended cleanly: the same socket served every request
    finally:
        conn.close()


def test_stream_knobs_from_constructor_and_control_endpoint() -> None:
    with MockLMServer(port=0, import_modules=False, chunk_latency_ms=5, stream_chunk_chars=4,
                      stream_error_after=2) as srv:
        knobs = srv.knobs()
        assert (knobs["chunk_latency_ms"], knobs["stream_chunk_chars"], knobs["stream_error_after"]) == (5, 4, 2)
        base = srv.url.removesuffix("/v1")
        resp = httpx.post(base + "/_control", json={"chunk_latency_ms": 1, "stream_chunk_chars": 0,
                                                   "stream_error_after": None}, timeout=5)
        assert resp.status_code == 200
        assert {k: resp.json()[k] for k in ("chunk_latency_ms", "stream_chunk_chars", "stream_error_after")} == {
            "chunk_latency_ms": 1.0, "stream_chunk_chars": 0, "stream_error_after": None}
        assert srv.knobs() == resp.json()
        assert httpx.post(base + "/_control", json={"stream_chunk_chars": "many"}, timeout=5).status_code == 400


# -- through DSPy -------------------------------------------------------------------------------------------------
@pytest.fixture(params=["auto", "litellm"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """DSPy's engine: ``auto`` picks the native (lm15) HTTP client for this model; ``litellm`` the compatibility one."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch in tests
    return str(request.param)


def _lm(server: MockLMServer, engine: str, **kw: Any) -> dspy.LM:
    return dspy.LM("openai/mock", api_base=server.url, api_key="x", cache=False, engine=engine, **kw)


def _streamed_predict() -> Any:
    return dspy.streamify(dspy.Predict("question -> answer"),
                          stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")],
                          async_streaming=False)


def test_dspy_streamify_through_the_server(server: MockLMServer, engine: str) -> None:
    chunks: list[str] = []
    predictions: list[dspy.Prediction] = []
    with dspy.context(lm=_lm(server, engine)):
        for item in _streamed_predict()(question="Who wrote the first program?"):
            if isinstance(item, dspy.streaming.StreamResponse):
                assert item.signature_field_name == "answer"
                chunks.append(item.chunk)
            elif isinstance(item, dspy.Prediction):
                predictions.append(item)
    assert len(predictions) == 1
    answer = predictions[0].answer
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == answer  # exactly: the listener drops the whitespace around the value, as the parser
    with dspy.context(lm=_lm(server, engine)):
        assert dspy.Predict("question -> answer")(question="Who wrote the first program?").answer == answer
    log = server.request_log()
    assert [e["stream"] for e in log] == [True, False] and log[0]["params"]["stream"] is True


def test_dspy_stream_error_mid_stream(server: MockLMServer, engine: str) -> None:
    server.control(stream_error_after=2)
    got: list[Any] = []
    with dspy.context(lm=_lm(server, engine, num_retries=0)), pytest.raises(LMServerError, match="stream error"):
        for item in _streamed_predict()(question="Who wrote the first program?"):
            got.append(item)
    assert not any(isinstance(item, dspy.Prediction) for item in got)
    log = server.request_log()
    assert log and all(e["stream"] and e.get("stream_error") for e in log)
    assert server.stats()["errors"] == len(log)
