"""Optimization spend is counted (summary, record, usage ledger) and a budget stops a run (issue 16 item 5)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks import errors
from dspex_tasks.lm.usage import usage_report
from dspex_tasks.testing.mockgen import rule_answer

pytestmark = pytest.mark.redis


def labelled(n: int) -> list[dict[str, Any]]:
    return [{"question": f"spend {i}", "answer": rule_answer({"question": f"spend {i}"})} for i in range(n)]


@pytest.fixture
def oclient(opt_app: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=opt_app.dspex_settings)
    yield c
    c.close()


def _ledger_calls(oclient: Any, session: str) -> int:
    rows = usage_report(oclient.redis, oclient.settings.namespace, session)
    return sum(r["lm_calls"] for r in rows if r["signature"] == "qa")


def _metric_calls() -> float:
    from dspex_tasks.observability.prometheus import REGISTRY

    return sum(s.value for m in REGISTRY.collect() if m.name == "dspex_lm_calls" for s in m.samples
               if s.name == "dspex_lm_calls_total")


def test_a_runs_spend_is_in_its_summary_record_and_the_usage_ledger(oclient: Any) -> None:
    before = _metric_calls()  # the in-process worker's metrics registry
    summary = oclient.optimize("qa", labelled(12), session="sp1", params={"eval_chunk_size": 4}).get(timeout=60)
    usage = summary["usage"]
    # Then the summary carries the run's tokens (the mock reports them) and its LM calls
    assert usage["lm_calls"] == summary["lm_calls"] > 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    rec = oclient.runs.get(summary["run_id"])
    assert (rec.prompt_tokens, rec.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    # And the usage ledger (what `dspex usage` reads) holds the same calls for the session's program
    deadline = time.time() + 5  # the ledger flushes in the background every second
    while _ledger_calls(oclient, "sp1") < summary["lm_calls"] and time.time() < deadline:
        time.sleep(0.2)
    assert _ledger_calls(oclient, "sp1") >= summary["lm_calls"]
    # And the worker's dspex_lm_calls_total counted every one of the run's calls
    assert _metric_calls() - before >= summary["lm_calls"]


def test_a_call_budget_stops_the_run_at_the_next_boundary_naming_the_limit(oclient: Any) -> None:
    # Given a budget smaller than the baseline evaluation alone
    run = oclient.optimize("qa", labelled(12), session="sp2", params={"eval_chunk_size": 2, "max_lm_calls": 3})
    # Then the run stops typed, saying what it spent against which limit, and promotes nothing
    with pytest.raises(errors.BudgetExceeded, match=r"LM calls >= max_lm_calls 3") as info:
        run.get(timeout=60)
    assert "nothing promoted" in str(info.value)
    rec = oclient.runs.get(run.id)
    assert rec.status == "failed" and rec.error and rec.error["type"] == "BudgetExceeded"
    assert 3 <= rec.lm_calls < 12 + 4  # stopped well before the compile and candidate stages ran
    assert oclient.runs.checkpoint(run.id, "candidate") is None
    assert oclient.programs.history("sp2", "qa") == []
    events = list(run.events())
    assert events[-1]["stage"] == "failed" and "max_lm_calls" in events[-1]["message"]


def test_budget_params_are_checked_before_enqueue(oclient: Any) -> None:
    with pytest.raises(errors.ValidationError) as info:
        oclient.optimize("qa", labelled(4), params={"max_cost_usd": -1})
    assert info.value.errors[0]["field"] == "params.max_cost_usd"
    assert oclient.runs.ids() == []
