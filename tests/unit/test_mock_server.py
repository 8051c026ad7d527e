"""The OpenAI-compatible mock server, called through DSPy's real LM client."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import dspy
import jsonschema
import pydantic
import pytest

from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.testing import mockgen
from dspex_tasks.testing.mock_server import MockLMServer, import_signature_modules

pytestmark = pytest.mark.unit

SPEC = (
    "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, "
    "entities: list[entity], label: literal['a','b'], ok: bool, count: int, groups: dict[str, list[int]], "
    "note: optional[str], either: int | str, vec: embedding"
)
INPUTS = {"text": "Ada Lovelace wrote the first program.", "context": ["history"]}


def _plain(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@pytest.fixture(scope="module")
def sig() -> Any:
    return signature(SPEC, name="mock_server_full", register=False)


@pytest.fixture(scope="module")
def server(sig: Any) -> Iterator[MockLMServer]:
    reg = SignatureRegistry()
    reg.add(sig)
    with MockLMServer(port=0, registry=reg) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(server: MockLMServer) -> Iterator[None]:
    server.control(latency_ms=0, error_rate=0, status=500, fail_next=0, retry_after_s=1, reset_stats=True)
    yield


def _lm(server: MockLMServer, **kw: Any) -> dspy.LM:
    return dspy.LM("openai/mock", api_base=server.url, api_key="sk-test", cache=False, **kw)


def _request(server: MockLMServer, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    base = server.url.removesuffix("/v1")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(use_json_adapter_fallback=False), dspy.JSONAdapter()],
                         ids=["chat", "json"])
@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought], ids=["predict", "cot"])
def test_dspy_lm_through_the_server(server: MockLMServer, sig: Any, adapter: dspy.Adapter, module: Any) -> None:
    lm = _lm(server)
    with dspy.context(lm=lm, adapter=adapter):
        pred = module(sig.to_dspy())(**INPUTS)
        again = module(sig.to_dspy())(**INPUTS)
    out = {k: _plain(pred[k]) for k in sig.output_fields}
    validated = sig.validate_outputs(out)
    jsonschema.Draft202012Validator(sig.output_schema()).validate(validated)
    assert 2 <= len(validated["analysis"]) <= 3  # typed from the server's registry
    assert out == {k: _plain(again[k]) for k in sig.output_fields}
    assert server.stats()["requests"] == 2


def test_same_answers_as_in_process_mock(server: MockLMServer, sig: Any) -> None:
    from dspex_tasks.testing.mock_lm import MockLM

    with dspy.context(lm=_lm(server)):
        remote = dspy.Predict(sig.to_dspy())(**INPUTS)
    with dspy.context(lm=MockLM(registry=server.registry)):
        local = dspy.Predict(sig.to_dspy())(**INPUTS)
    assert {k: _plain(remote[k]) for k in sig.output_fields} == {k: _plain(local[k]) for k in sig.output_fields}


def test_response_format_json_schema(server: MockLMServer) -> None:
    sig = signature("text: str -> ents: list[entity], c: confidence_score, tag: optional[literal['x', 'y']], "
                    "steps: reasoning_chain, n: int | str", name="mock_server_rf", register=False)
    fmt = sig.json_schema("openai")
    body = {"model": "mock", "messages": [{"role": "user", "content": "[[ ## text ## ]]\nhi"}], "response_format": fmt}
    status, headers, payload = _request(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and payload["object"] == "chat.completion"
    choice = payload["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    value = json.loads(choice["message"]["content"])
    jsonschema.Draft202012Validator(fmt["json_schema"]["schema"]).validate(value)
    sig.validate_outputs(value)
    assert payload["usage"]["total_tokens"] == payload["usage"]["prompt_tokens"] + payload["usage"]["completion_tokens"]
    assert int(headers["Content-Length"]) > 0


def test_plain_chat_and_routes(server: MockLMServer) -> None:
    body = {"model": "mock", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    status, _, payload = _request(server, "POST", "/chat/completions", body)
    assert status == 200
    assert payload["choices"][0]["message"]["content"] == mockgen.answer([{"role": "user", "content": "hello"}])
    assert _request(server, "GET", "/health")[0] == 200
    status, _, models = _request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["mock"]
    assert _request(server, "GET", "/nope")[0] == 404
    assert _request(server, "POST", "/v1/chat/completions", {"messages": "bad"})[0] == 400
    status, headers, payload = _request(server, "POST", "/v1/chat/completions", {**body, "n": "many"})
    assert status == 500 and "mock LM server error" in payload["error"]["message"]
    assert _request(server, "GET", "/health")[0] == 200  # still serving


def test_keep_alive_reuses_one_connection(server: MockLMServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
    try:
        for _ in range(3):
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Content-Length") is not None
            assert not resp.will_close
            json.loads(resp.read())
        sock = conn.sock
        conn.request("GET", "/health")
        conn.getresponse().read()
        assert conn.sock is sock  # the same socket served every request
    finally:
        conn.close()


def test_injected_server_error(server: MockLMServer, sig: Any) -> None:
    status, _, knobs = _request(server, "POST", "/_control", {"fail_next": 1, "status": 503})
    assert status == 200 and knobs["fail_next"] == 1
    with dspy.context(lm=_lm(server, num_retries=0)), pytest.raises(Exception, match="503|injected"):
        dspy.Predict(sig.to_dspy())(**INPUTS)
    with dspy.context(lm=_lm(server, num_retries=0)):
        dspy.Predict(sig.to_dspy())(**INPUTS)  # fail_next was used up
    stats = _request(server, "GET", "/_stats")[2]
    assert stats == {"requests": 2, "errors": 1, "in_flight": 0, "max_in_flight": 1}


def test_injected_rate_limit_has_retry_after(server: MockLMServer, sig: Any) -> None:
    server.control(error_rate=1.0, status=429, retry_after_s=2)
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, payload = _request(server, "POST", "/v1/chat/completions", body)
    assert status == 429 and headers["Retry-After"] == "2"
    assert payload["error"]["type"] == "rate_limit_exceeded"
    with dspy.context(lm=_lm(server, num_retries=0)), pytest.raises(Exception, match="429|rate"):
        dspy.Predict(sig.to_dspy())(**INPUTS)
    assert server.stats()["errors"] == 2
    server.control(error_rate=0.0)
    assert _request(server, "POST", "/v1/chat/completions", body)[0] == 200


def test_latency_and_in_flight(server: MockLMServer) -> None:
    server.control(latency_ms=200)
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
    codes: list[int] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda: codes.append(_request(server, "POST", "/v1/chat/completions", body)[0]))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.perf_counter() - start >= 0.2
    assert codes == [200] * 4
    stats = server.stats()
    assert stats["requests"] == 4 and stats["in_flight"] == 0 and stats["max_in_flight"] >= 2


def test_bad_control_is_rejected(server: MockLMServer) -> None:
    assert _request(server, "POST", "/_control", {"latency_ms": "slow"})[0] == 400
    assert _request(server, "POST", "/_control", [1])[0] == 400


def test_signature_modules_from_env(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DSPEX_SIGNATURE_MODULES", "json, dspex_tasks_no_such_module")
    with caplog.at_level(logging.WARNING, logger="dspex_tasks.testing.mock_server"):
        assert import_signature_modules() == ["json"]
        with MockLMServer(port=0) as srv:
            assert srv.url.startswith("http://127.0.0.1:") and srv.port > 0
            assert _request(srv, "GET", "/health")[0] == 200
    assert "dspex_tasks_no_such_module" in caplog.text
