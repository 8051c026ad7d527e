"""Layer 3: GEPA runs on real worker processes with the HTTP mock LM, through a SIGKILL mid-compile.

The workers import this module as a signature module (``DSPEX_SIGNATURE_MODULES``) for its metric, whose
feedback states the rule the labels follow; the mock LM's ``learns_from_instructions`` scenario follows that
rule once a predictor's instructions state it, so a GEPA candidate can win.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks.client import Client
from dspex_tasks.optimize.metrics import metric
from dspex_tasks.optimize.runs import RunStore
from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.testing.mockgen import RULE_TEXT, rule_answer
from tests._procs import WorkerProcess, wait_for

pytestmark = pytest.mark.system

QUEUES = "dspex.predict,dspex.optimize"
N_VAL = 6


@metric("rule_feedback")
def rule_feedback(example: Any, prediction: Any, trace: Any = None) -> dict[str, Any]:
    """Exact match, with feedback that states the labels' rule."""
    ok = prediction["answer"] == example["answer"]
    return {"score": float(ok), "feedback": "Correct." if ok else f"{RULE_TEXT} Expected {example['answer']!r}."}


def labelled(n: int, prefix: str = "what is item") -> list[dict[str, Any]]:
    return [{"question": f"{prefix} {i}", "answer": rule_answer({"question": f"{prefix} {i}"})} for i in range(n)]


@pytest.fixture
def mock_lm() -> Iterator[MockLMServer]:
    server = MockLMServer(port=0, latency_ms=10).start()
    server.control(scenario="learns_from_instructions")
    yield server
    server.stop()


@pytest.fixture
def env(mock_lm: MockLMServer) -> dict[str, str]:
    # A short visibility timeout and lease so a killed worker's stage is redelivered within seconds.
    return {"DSPEX_LM": "openai/mock", "DSPEX_LM_API_BASE": mock_lm.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
            "DSPEX_VISIBILITY_TIMEOUT_S": "10", "DSPEX_LEASE_TTL_S": "4", "DSPEX_LM_NUM_RETRIES": "0",
            "DSPEX_LM_TIMEOUT_S": "5",
            "DSPEX_SIGNATURE_MODULES": "signatures,signatures.programs,tests.system.test_gepa_system"}


def start(redis_url: str, namespace: str, env: dict[str, str], tmp_path: Path, name: str) -> WorkerProcess:
    w = WorkerProcess(redis_url, namespace, queues=QUEUES, concurrency=16, log_dir=tmp_path, env=env, name=name)
    w.wait_ready()
    return w


def gepa_checkpoint(client: Client, run_id: str) -> dict[str, Any] | None:
    data = RunStore(redis=client.redis, namespace=client.settings.namespace).checkpoint(run_id, "compile:gepa_state")
    return data if isinstance(data, dict) else None


def test_gepa_run_promotes_then_gate_refuses_a_run_without_gain(client: Client, redis_url: str, namespace: str,
                                                                env: dict[str, str], tmp_path: Path) -> None:
    w = start(redis_url, namespace, env, tmp_path, "gepa1")
    try:
        wait_for(lambda: "rule_feedback" in client.capabilities().get("metrics", []), timeout_s=15,
                 what="the worker's metrics published")
        # Given a metric whose feedback states the rule, when a GEPA run finishes
        run = client.optimize("qa", labelled(8), valset=labelled(N_VAL, "held out"), metric="rule_feedback",
                              optimizer="gepa", session="ga", params={"max_metric_calls": 40, "eval_chunk_size": 3})
        summary = run.get(timeout=60)
        # Then its candidate won and was promoted, and its events carried every candidate's valset score
        assert summary["promoted"] is True and (summary["baseline_score"], summary["score"]) == (0.0, 1.0)
        assert "beat baseline" in summary["reason"] and summary["trials"] == [0.0, 1.0]
        scored = [(e["candidate"], e["score"]) for e in run.events(timeout=10) if "candidate" in e]
        assert scored == [(0, 0.0), (1, 1.0)]
        res = client.submit("qa", {"question": "fresh one"}, session="ga").get(timeout=30)
        assert res.program_version == 1 and res.outputs["answer"] == rule_answer({"question": "fresh one"})
        # When a second run starts from the promoted program, which already states the rule
        again = client.optimize("qa", labelled(8), valset=labelled(N_VAL, "held out"), metric="rule_feedback",
                                optimizer="gepa", session="ga", params={"max_metric_calls": 20}).get(timeout=60)
        # Then the gate refuses it: no gain, nothing promoted
        assert again["promoted"] is False and again["baseline_score"] == again["score"] == 1.0
        assert client.programs.history("ga", "qa") == [1]
    finally:
        w.stop()


def test_gepa_resumes_from_its_state_after_sigkill(client: Client, redis_url: str, namespace: str,
                                                   env: dict[str, str], mock_lm: MockLMServer,
                                                   tmp_path: Path) -> None:
    budget = 150
    a = start(redis_url, namespace, env, tmp_path, "gepa-victim")
    b = None
    try:
        wait_for(lambda: "rule_feedback" in client.capabilities().get("metrics", []), timeout_s=15,
                 what="the worker's metrics published")
        mock_lm.control(latency_ms=20, reset_stats=True)
        # Given a GEPA run that has saved its state at least once, with 60+ of its metric calls spent
        run = client.optimize("qa", labelled(8), valset=labelled(N_VAL, "held out"), metric="rule_feedback",
                              optimizer="gepa", session="gk", params={"max_metric_calls": budget,
                                                                       "eval_chunk_size": 3})
        wait_for(lambda: (gepa_checkpoint(client, run.id) or {}).get("total_num_evals", 0) >= 60, timeout_s=30,
                 interval_s=0.01, what="a GEPA state checkpoint 60 metric calls in")
        # When the worker is killed outright mid-compile
        a.kill_group()
        a.stop()
        at_kill = gepa_checkpoint(client, run.id)
        assert at_kill is not None and at_kill["total_num_evals"] < budget
        assert RunStore(redis=client.redis, namespace=namespace).checkpoint(run.id, "candidate") is None
        b = start(redis_url, namespace, env, tmp_path, "gepa-rescuer")
        summary = run.get(timeout=60)
        # Then a second worker finished the run, and it promoted the winning candidate
        assert summary["promoted"] is True and (summary["baseline_score"], summary["score"]) == (0.0, 1.0)
        # And GEPA resumed where the checkpoint left off: iteration counter, candidates and metric calls carry on
        final = gepa_checkpoint(client, run.id)
        assert final is not None and final["iteration"] > at_kill["iteration"]
        assert budget <= final["total_num_evals"] <= budget + 3
        kept = at_kill["state"]["program_candidates"]
        assert final["state"]["program_candidates"][:len(kept)] == kept
        messages = [str(e.get("message")) for e in run.events(timeout=10) if e["stage"] == "compile"]
        resumed = f"resuming GEPA after iteration {at_kill['iteration']}: "
        assert sum(m.startswith(resumed) for m in messages) == 1, messages
        # And no more LM calls were made than one run plus the redone iteration (starting over would add 60+):
        # baseline and candidate evaluations, the budget (+ one minibatch over), reflections, the seed re-scored
        # on one example, and the killed iteration done again
        requests = mock_lm.stats()["requests"]
        assert requests <= 2 * N_VAL + (budget + 3) + 3 + 1 + (3 + N_VAL), requests
    finally:
        for w in (a, b):
            if w is not None:
                w.stop()
