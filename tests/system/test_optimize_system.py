"""Layer 3: optimization runs on real worker processes with the HTTP mock LM (dspy -> HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.testing.mockgen import rule_answer
from tests._procs import WorkerProcess, wait_for

pytestmark = pytest.mark.system

QUEUES = "dspex.predict,dspex.optimize"


def labelled(n: int) -> list[dict[str, Any]]:
    return [{"question": f"what is item {i}", "answer": rule_answer({"question": f"what is item {i}"})}
            for i in range(n)]


@pytest.fixture
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0, latency_ms=20).start()
    server.control(scenario="learns_from_demos")
    yield server
    server.stop()


@pytest.fixture
def env(mock_lm: MockLMServer) -> dict[str, str]:
    # A short visibility timeout and lease so a killed worker's stage is redelivered within seconds (and an
    # LM timeout below it: settings refuse a visibility timeout an LM call can outlast).
    return {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
            "DSPEX_VISIBILITY_TIMEOUT_S": "10", "DSPEX_LEASE_TTL_S": "4", "DSPEX_LM_NUM_RETRIES": "0",
            "DSPEX_LM_TIMEOUT_S": "5"}


def start(redis_url: str, namespace: str, env: dict[str, str], tmp_path: Path, name: str) -> WorkerProcess:
    w = WorkerProcess(redis_url, namespace, queues=QUEUES, concurrency=16, log_dir=tmp_path, env=env, name=name)
    w.wait_ready()
    return w


def test_run_promotes_gates_and_replays(client: Client, redis_url: str, namespace: str, env: dict[str, str],
                                       tmp_path: Path) -> None:
    w = start(redis_url, namespace, env, tmp_path, "opt1")
    try:
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        # Given demos that help, when a run finishes, then it promotes and the session serves the new version
        run = client.optimize("qa", labelled(20), session="sa", params={"eval_chunk_size": 3})
        summary = run.get(timeout=90)
        assert summary["promoted"] is True and summary["score"] == 1.0 and summary["baseline_score"] == 0.0
        res = client.submit("qa", {"question": "fresh one"}, session="sa").get(timeout=30)
        assert res.program_version == summary["program_version"] == 1
        assert res.outputs["answer"] == rule_answer({"question": "fresh one"})
        # A late follower replays every event from the start, in order
        events = list(client.run(run.id).events(timeout=10))
        assert events[0]["stage"] == "queued" and events[-1]["stage"] == "done"
        assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
        # When the program already does its best, a second run does not promote
        again = client.optimize("qa", labelled(20), session="sa", params={"eval_chunk_size": 5}).get(timeout=90)
        assert again["promoted"] is False and client.programs.history("sa", "qa") == [1]
    finally:
        w.stop()


def test_run_survives_sigkill_of_its_worker(client: Client, redis_url: str, namespace: str, env: dict[str, str],
                                           mock_lm: MockLMServer, tmp_path: Path) -> None:
    a = start(redis_url, namespace, env, tmp_path, "victim")
    b = None
    try:
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        mock_lm.control(latency_ms=150)  # long enough to kill the worker mid-stage
        run = client.optimize("qa", labelled(24), session="sk", params={"eval_chunk_size": 2})
        stages = iter(run.events(timeout=60))
        next(e for e in stages if e["stage"] in ("compile", "candidate"))
        # When the worker running the run is killed outright (main process and threads)
        a.kill_group()
        a.stop()
        b = start(redis_url, namespace, env, tmp_path, "rescuer")
        # Then the redelivered stage resumes from the last checkpoint and the run completes as it would have
        summary = run.get(timeout=120)
        assert summary["promoted"] is True and summary["score"] == 1.0 and summary["baseline_score"] == 0.0
        assert client.programs.history("sk", "qa") == [1]
    finally:
        for w in (a, b):
            if w is not None:
                w.stop()


def test_cancel_leaves_program_untouched(client: Client, redis_url: str, namespace: str, env: dict[str, str],
                                         mock_lm: MockLMServer, tmp_path: Path) -> None:
    w = start(redis_url, namespace, env, tmp_path, "canceller")
    try:
        wait_for(lambda: "qa" in client.signatures(refresh=True), what="signatures published")
        mock_lm.control(latency_ms=100)
        client.programs.put("sc", "qa", {"demos": []}, signature="qa")
        run = client.optimize("qa", labelled(30), session="sc", params={"eval_chunk_size": 3})
        next(e for e in run.events(timeout=60) if e["stage"] == "baseline")
        run.cancel()
        assert list(run.events(timeout=60))[-1]["stage"] == "cancelled"
        assert run.status()["status"] == "cancelled"
        assert client.programs.history("sc", "qa") == [1]
    finally:
        w.stop()
