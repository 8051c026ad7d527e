"""Layer 3: real worker OS processes, real Redis, the HTTP mock LM through dspy -> LiteLLM -> HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import signatures  # noqa: F401 - the reference signatures, to validate outputs here
from dspex_tasks.client import Client
from dspex_tasks.dsl.signature import registry
from dspex_tasks.testing.mock_server import MockLMServer
from tests._procs import ROOT, WorkerProcess, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0, latency_ms=5).start()
    yield server
    server.stop()


@pytest.fixture
def workers(redis_url: str, namespace: str, mock_lm: MockLMServer, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_CACHE_VERIFY_S": "1.0"}
    procs = [WorkerProcess(redis_url, namespace, concurrency=32, log_dir=tmp_path, env=env) for _ in range(2)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def client(redis_url: str, namespace: str, workers: list[WorkerProcess]) -> Iterator[Client]:
    c = Client(redis_url=redis_url, namespace=namespace)
    wait_for(lambda: "qa" in c.signatures(refresh=True), what="signatures published")
    yield c
    c.close()


def test_500_tasks_across_20_sessions(client: Client, workers: list[WorkerProcess]) -> None:
    # Given two warm worker processes, when 500 tasks over 20 sessions and 2 signatures are submitted
    jobs = []
    for i in range(500):
        session = f"sess-{i % 20}"
        if i % 2:
            jobs.append(("qa", client.submit("qa", {"question": f"q{i}"}, session=session)))
        else:
            jobs.append(("classify", client.submit("classify", {"text": f"text {i}"}, session=session)))
    results = [(name, job.get(timeout=60)) for name, job in jobs]
    # Then every one succeeds with outputs that fit its signature, and both processes served
    for name, res in results:
        assert registry.get(name).validate_outputs(res.outputs) == res.outputs
        assert res.lm == "openai/mock" and res.usage["total_tokens"] > 0
    assert len({res.worker for _, res in results}) == 2
    assert Counter(res.session for _, res in results) == Counter({f"sess-{i}": 25 for i in range(20)})


def test_program_put_reaches_every_worker_process(client: Client, workers: list[WorkerProcess]) -> None:
    for _ in range(40):  # warm both caches for the session
        client.submit("qa", {"question": "warm"}, session="hot").get(timeout=30)
    version = client.programs.put("hot", "qa", {"demos": [{"question": "a", "answer": "b", "confidence": 0.5}]},
                                  signature="qa")
    time.sleep(1.2)  # the promised bound: a put reaches every worker within a second
    served = [client.submit("qa", {"question": f"after {i}"}, session="hot").get(timeout=30) for i in range(60)]
    assert {r.program_version for r in served} == {version}
    assert len({r.worker for r in served}) == 2


def test_bare_celery_send_task(client: Client, redis_url: str) -> None:
    import celery

    app = celery.Celery(broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    r = app.send_task("dspex.qa", kwargs={"inputs": {"question": "plain celery"}, "session": None, "program": None},
                      queue="dspex.predict")
    value = r.get(timeout=30)
    assert set(value) >= {"outputs", "session", "program", "program_version", "usage", "lm", "duration_ms"}
    assert registry.get("qa").validate_outputs(value["outputs"]) == value["outputs"]


def test_client_without_dspy(client: Client, redis_url: str, namespace: str) -> None:
    # Given a process where importing dspy or litellm fails
    code = f"""
import sys, json
sys.modules['dspy'] = None
sys.modules['litellm'] = None
sys.modules['signatures'] = None
from dspex_tasks import Client, errors
c = Client(redis_url={redis_url!r}, namespace={namespace!r})
res = c.submit("qa", {{"question": "no dspy here"}}, session="nodspy").get(timeout=30)
try:
    c.submit("qa", {{"question": 1}})
    bad = "accepted"
except errors.ValidationError as e:
    bad = e.errors[0]["field"]
print(json.dumps({{"outputs": res.outputs, "bad": bad, "dspy": 'dspy' in sys.modules and sys.modules['dspy'] is not None}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    # Then it submits, gets typed results and validation errors, without dspy
    assert set(data["outputs"]) == {"answer", "confidence"}
    assert data["bad"] == "question" and data["dspy"] is False


def test_trace_and_lm_config_through_litellm_and_http(client: Client, mock_lm: MockLMServer) -> None:
    # Given real workers on the real dspy -> LiteLLM -> HTTP path, and the mock server's request log
    before = len(mock_lm.request_log())
    # When a ChainOfThought job asks for its trace and per-request LM settings
    res = client.submit("complex_analysis", {"text": "Ada met Alan in London.", "context": ["1843"]},
                        trace=True, lm_config={"temperature": 0.3, "max_tokens": 50}).get(timeout=30)
    # Then the trace carries the reasoning the LM produced, and the outputs are the ones it parsed
    assert [call["predictor"] for call in res.trace] == ["predict"]
    call = res.trace[0]
    assert call["inputs"] == {"text": "Ada met Alan in London.", "context": ["1843"]}
    assert isinstance(call["outputs"]["reasoning"], str) and call["outputs"]["reasoning"]
    assert call["outputs"]["confidence"] == res.outputs["confidence"]
    assert res.lm == "openai/mock" and res.usage["total_tokens"] > 0
    # And the provider received the settings in the request body
    sent = [entry["params"] for entry in mock_lm.request_log()[before:]]
    assert len(sent) == 1 and sent[0]["temperature"] == 0.3
    assert sent[0].get("max_tokens", sent[0].get("max_completion_tokens")) == 50
    # And the next job without options is back to the worker's own settings
    client.submit("complex_analysis", {"text": "plain", "context": []}).get(timeout=30)
    assert mock_lm.request_log()[-1]["params"].get("temperature") != 0.3
