"""Layer 3: ``dspex gateway`` as its own process, real worker processes, the HTTP mock LM, non-Python clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.testing.mockgen import rule_answer
from tests._procs import ROOT, WorkerProcess, wait_for, worker_env

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def labelled(n: int) -> list[dict[str, Any]]:
    return [{"question": f"what is item {i}", "answer": rule_answer({"question": f"what is item {i}"})}
            for i in range(n)]


@dataclass(frozen=True)
class Target:
    redis_url: str
    namespace: str

    def env(self, **extra: str) -> dict[str, str]:
        ns = self.namespace
        return worker_env(self.redis_url, ns, DSPEX_PREDICT_QUEUE=f"{ns}.predict",
                          DSPEX_OPTIMIZE_QUEUE=f"{ns}.optimize", **extra)

    def dspex(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dspex_tasks", *args], cwd=ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def target(redis_base_url: str) -> Target:
    return Target(redis_base_url, f"gws{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0, latency_ms=20).start()
    server.control(scenario="learns_from_demos")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(target: Target, mock_lm: MockLMServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One worker OS process on both queues, answering through the HTTP mock LM (dspy -> HTTP)."""
    import redis

    from dspex_tasks import keys

    ns = target.namespace
    env = {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_LM_NUM_RETRIES": "0", "DSPEX_PREDICT_QUEUE": f"{ns}.predict",
           "DSPEX_OPTIMIZE_QUEUE": f"{ns}.optimize"}
    proc = WorkerProcess(target.redis_url, ns, queues=f"{ns}.predict,{ns}.optimize", concurrency=16,
                         name=f"gw-{ns}", log_dir=tmp_path_factory.mktemp("gw-worker"), env=env)
    r = redis.Redis.from_url(target.redis_url)
    try:
        proc.wait_ready(timeout_s=60)
        wait_for(lambda: r.hexists(keys.signatures(ns), "qa") and r.hexists(keys.capabilities(ns), "optimizers"),
                 timeout_s=30, what="signatures published")
        yield proc
    finally:
        r.close()
        proc.stop(timeout_s=10)


@pytest.fixture(scope="module")
def gateway(target: Target, worker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``dspex gateway`` in its own process (uvicorn), on a free loopback port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("gw") / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dspex_tasks", "gateway", "--port", str(port),
                                 "--log-level", "warning"], cwd=ROOT, env=target.env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return httpx.get(url + "/healthz", timeout=1).json()["signatures"] >= 1
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout_s=30, interval_s=0.1, what="gateway healthy")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        assert proc.returncode is not None


@pytest.fixture(scope="module")
def key(target: Target) -> str:
    """A key made the way an operator makes one: ``dspex keys create`` prints it once on stdout. Scoped to the
    sessions these tests use and the default program (read, write: the default rights)."""
    done = target.dspex("keys", "create", "--name", "system-tests", "--sessions", "sse,node,@default")
    assert done.returncode == 0, done.stderr
    raw = done.stdout.strip()
    assert raw.startswith("dsk_") and "\n" not in raw and "system-tests" in target.dspex("keys", "ls").stdout
    return raw


def read_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse a text/event-stream as it arrives: {"id", "event", "data", "at"} per event."""
    event: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in event:
                yield {**event, "data": json.loads(event["data"]), "at": time.monotonic()}
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")


def test_sse_follows_an_optimization_run_to_completion(gateway: str, key: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=gateway, headers=auth, timeout=60) as c:
        r = c.post("/v1/optimizations", json={"signature": "qa", "trainset": labelled(20), "session": "sse",
                                              "params": {"eval_chunk_size": 3}})
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        # follow live: the stream opens while the run is still going and ends with its last event
        seen: list[dict[str, Any]] = []
        with c.stream("GET", f"/v1/optimizations/{run_id}/events") as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            for event in read_events(stream):
                if not seen:
                    assert c.get(f"/v1/optimizations/{run_id}").json()["status"] not in ("succeeded", "failed")
                seen.append(event)
        stages = [e["data"]["stage"] for e in seen]
        assert list(dict.fromkeys(stages)) == ["queued", "load", "baseline", "compile", "candidate", "done"]
        assert stages[-1] == "done" and seen[-1]["data"]["score"] == 1.0
        assert [e["data"]["ts"] for e in seen] == sorted(e["data"]["ts"] for e in seen)
        assert seen[-1]["at"] - seen[0]["at"] > 0.1  # delivered as they happened, not in one burst at the end
        record = c.get(f"/v1/optimizations/{run_id}").json()
        assert record["status"] == "succeeded" and record["summary"]["promoted"] is True
        # a late follower replays everything; Last-Event-ID resumes after an event
        replay = c.get(f"/v1/optimizations/{run_id}/events").text
        assert replay.count("\ndata: ") + replay.startswith("data: ") == len(seen)
        middle = seen[len(seen) // 2]["id"]
        with c.stream("GET", f"/v1/optimizations/{run_id}/events", headers={"Last-Event-ID": middle}) as stream:
            rest = list(read_events(stream))
        assert [e["id"] for e in rest] == [e["id"] for e in seen[len(seen) // 2 + 1:]]
        # the promoted program serves the session
        res = c.post("/v1/signatures/qa:run", json={"inputs": {"question": "fresh one"}, "session": "sse"}).json()
        assert res["result"]["outputs"]["answer"] == rule_answer({"question": "fresh one"})
        assert res["result"]["program_version"] == record["summary"]["program_version"]


def test_sse_streams_a_jobs_tokens_as_the_lm_sends_them(gateway: str, key: str, mock_lm: MockLMServer) -> None:
    mock_lm.control(chunk_latency_ms=30)  # the mock LM streams its answer chunk by chunk
    try:
        with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            r = c.post("/v1/signatures/qa/jobs", json={"inputs": {"question": "What do the chunks spell?"},
                                                       "stream": True, "timeout_s": 30})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            with c.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
                seen = list(read_events(stream))
            # (the result event is written just before the worker stores the result)
            wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["state"] == "SUCCESS", timeout_s=10,
                     what="the job's stored result")
            view = c.get(f"/v1/jobs/{job_id}").json()
    finally:
        mock_lm.control(chunk_latency_ms=0)
    tokens = [e for e in seen if e["event"] == "token" and e["data"]["field"] == "answer"]
    assert len(tokens) > 1, seen  # the provider's chunks, not one settled piece
    assert tokens[-1]["at"] - tokens[0]["at"] > 0.03  # delivered as they came, not in one burst at the end
    assert seen[-1]["event"] == "result" and seen[-1]["id"] == seen[-1]["data"]["id"]
    assert "".join(e["data"]["chunk"] for e in tokens) == view["result"]["outputs"]["answer"]
    assert seen[-1]["data"]["result"] == view["result"]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (built-in fetch, Node >= 18)")
def test_node_client_end_to_end(gateway: str, key: str) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "GATEWAY_URL": gateway, "GATEWAY_KEY": key}
    done = subprocess.run(["node", str(HERE / "gateway_client.mjs")], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["unauthorized"] == {"status": 401, "type": "application/problem+json", "code": "unauthorized"}
    assert "qa" in seen["signatures"] and seen["questionType"] == "string"
    assert seen["submit"]["status"] == 202 and seen["submit"]["state"] == "PENDING"
    job = seen["polled"]["job"]
    assert seen["polled"]["status"] == 200 and job["state"] == "SUCCESS" and job["signature"] == "qa"
    assert job["result"]["session"] == "node" and isinstance(job["result"]["outputs"]["answer"], str)
    assert seen["run"]["status"] == 200 and seen["run"]["job"]["state"] == "SUCCESS"
    assert 0 <= seen["run"]["job"]["result"]["outputs"]["confidence"] <= 1
    assert seen["events"]["status"] == 200 and seen["events"]["type"].startswith("text/event-stream")
    assert "event: result" in seen["events"]["text"] and seen["run"]["job"]["id"] in seen["events"]["text"]
    assert seen["invalid"]["status"] == 422 and seen["invalid"]["type"] == "application/problem+json"
    assert seen["invalid"]["errors"][0]["field"] == "question"
    assert seen["program"]["put"]["version"] == 1 and seen["program"]["programVersion"] == 1


def test_keys_revoke_and_auth_off_refuses_public_bind(target: Target, gateway: str) -> None:
    made = target.dspex("keys", "create", "--name", "short-lived", "--rate-per-min", "5")
    raw = made.stdout.strip()
    assert httpx.get(gateway + "/v1/signatures", headers={"X-API-Key": raw}).status_code == 200
    listed = json.loads(target.dspex("keys", "ls", "--json").stdout)
    assert {"name": "short-lived", "rate_per_min": 5}.items() <= next(
        k for k in listed if k["name"] == "short-lived").items()
    assert raw not in json.dumps(listed)
    # least privilege by default: the default program only; the refusal names the session and how to grant it
    body = {"inputs": {"question": "q"}, "session": "elsewhere"}
    refused = httpx.post(gateway + "/v1/signatures/qa/jobs", headers={"X-API-Key": raw}, json=body)
    assert refused.status_code == 403 and refused.json()["session"] == "elsewhere"
    key_id = raw.split("_")[1]
    assert f"dspex keys grant {key_id} --sessions elsewhere" in refused.json()["detail"]
    assert target.dspex("keys", "grant", key_id, "--sessions", "elsewhere").returncode == 0
    assert httpx.post(gateway + "/v1/signatures/qa/jobs", headers={"X-API-Key": raw}, json=body).status_code == 202
    assert target.dspex("keys", "revoke", "short-lived").returncode == 0
    assert httpx.get(gateway + "/v1/signatures", headers={"X-API-Key": raw}).status_code == 401
    refused = target.dspex("gateway", "--no-auth", "--host", "0.0.0.0")
    assert refused.returncode == 2 and "loopback" in refused.stderr


def test_lm_failure_is_a_502_problem(gateway: str, key: str, mock_lm: MockLMServer) -> None:
    before = mock_lm.control()
    mock_lm.control(status=400, fail_next=1)  # not retryable: the job fails at once
    try:
        with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            r = c.post("/v1/signatures/qa:run", json={"inputs": {"question": "fails"}})
            assert r.status_code == 502 and r.headers["content-type"] == "application/problem+json"
            problem = r.json()
            assert problem["code"].startswith("lm_") and problem["job_id"]  # lm_error or a subclass's code
            job = c.get(f"/v1/jobs/{problem['job_id']}").json()
            assert job["state"] == "FAILURE" and job["error"]["code"] == problem["code"]
    finally:
        mock_lm.control(status=before["status"], fail_next=0)
