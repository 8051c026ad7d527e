"""Run records are typed (a dataclass and a status enum) and keep their JSON form."""

from __future__ import annotations

import json

import pytest

from dspex_tasks.optimize.runs import END_STAGES, TERMINAL, RunRecord, RunStatus, Stage
from dspex_tasks.optimize.stages import PLAN

pytestmark = pytest.mark.unit


def test_a_record_round_trips_through_its_json() -> None:
    raw = {"run_id": "r1", "status": "succeeded", "stage": "done", "created_at": 1.0, "signature": "qa",
           "session": "s", "program": "qa", "optimizer": "bootstrap_few_shot", "metric": "exact_match",
           "params": {"seed": 1}, "dataset": "", "scheduled": False, "schedule": "", "lm_calls": 12,
           "prompt_tokens": 900, "completion_tokens": 120, "cost_usd": 0.00021, "best_score": 0.5, "summary": {"promoted": True}, "cancel_requested": True, "future_field": [1]}
    rec = RunRecord.from_json(json.loads(json.dumps(raw)))
    assert rec.status is RunStatus.SUCCEEDED and rec.status.terminal and rec.lm_calls == 12
    assert rec.extra == {"future_field": [1]}  # a newer worker's field is kept, not dropped
    assert rec.to_json() == raw


def test_status_and_stage_values_are_the_wire_strings() -> None:
    assert {s.value for s in TERMINAL} == {"succeeded", "failed", "cancelled"}
    assert "succeeded" in TERMINAL and "done" in END_STAGES  # plain strings (JSON, SSE readers) still match
    assert not RunStatus.RUNNING.terminal
    assert [s.value for s in PLAN] == ["load", "baseline", "compile", "candidate", "decide"]
    assert json.dumps({"stage": Stage.LOAD}) == '{"stage": "load"}'
