"""Layer 3: a run's LM spend, priced, through real workers and the HTTP mock LM; a cost budget stops a run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex_tasks import errors
from dspex_tasks.client import Client
from dspex_tasks.testing.mock_server import MockLMServer
from dspex_tasks.testing.mockgen import rule_answer
from tests._procs import WorkerProcess, wait_for

pytestmark = pytest.mark.system


def labelled(n: int) -> list[dict[str, Any]]:
    return [{"question": f"priced {i}", "answer": rule_answer({"question": f"priced {i}"})} for i in range(n)]


@pytest.fixture
def worker(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    server = MockLMServer(port=0, latency_ms=5).start()
    server.control(scenario="learns_from_demos")
    # A model LiteLLM's price table knows, served by the mock: every call has a price
    env = {"DSPEX_LM": "openai/gpt-4o-mini", "DSPEX_LM_API_BASE": server.url, "DSPEX_LM_API_KEY": "sk-test-not-real",
           "DSPEX_LM_NUM_RETRIES": "0"}
    w = WorkerProcess(redis_url, namespace, queues="dspex.predict,dspex.optimize", concurrency=8, log_dir=tmp_path,
                      env=env, name="spend")
    w.wait_ready()
    yield w
    w.stop()
    server.stop()


def test_priced_spend_is_reported_and_a_cost_budget_stops_a_run(client: Client, worker: WorkerProcess) -> None:
    wait_for(lambda: "qa" in client.signatures(refresh=True), timeout_s=30, what="signatures published")
    summary = client.optimize("qa", labelled(10), session="pr1", params={"eval_chunk_size": 5}).get(timeout=60)
    spent = summary["usage"]["cost_usd"]
    assert spent > 0 and summary["usage"]["prompt_tokens"] > 0, summary["usage"]
    # A budget below what the baseline evaluation costs stops the run before it compiles
    run = client.optimize("qa", labelled(10), session="pr2",
                          params={"eval_chunk_size": 5, "max_cost_usd": spent / 100})
    with pytest.raises(errors.BudgetExceeded, match="max_cost_usd"):
        run.get(timeout=60)
    rec = client.runs.get(run.id)
    assert 0 < rec.cost_usd < spent and rec.stage == "failed"
    assert client.programs.history("pr2", "qa") == []
