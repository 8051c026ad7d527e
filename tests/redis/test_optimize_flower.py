"""What Flower shows of an optimization run: named stages, the stage first, results that say something, and
progress in the Result column while a stage runs (issue 17 item 5). Read from the worker's Celery events, which
is all Flower reads."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks.testing.mockgen import rule_answer
from tests._procs import celery_events

pytestmark = pytest.mark.redis


@pytest.fixture
def oclient(opt_app: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=opt_app.dspex_settings)
    yield c
    c.close()


def test_stages_are_named_lead_with_the_stage_and_report_progress_and_scores(oclient: Any) -> None:
    tasks: dict[str, dict[str, Any]] = {}
    progress: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        task = tasks.setdefault(event["uuid"], {})
        task.update({k: v for k, v in event.items() if v is not None})
        if event["type"] == "task-progress":
            progress.append(event)

    with celery_events(oclient.app, {"*": lambda e: e.get("uuid") and on_event(e)}):
        rows = [{"question": f"f {i}", "answer": rule_answer({"question": f"f {i}"})} for i in range(12)]
        summary = oclient.optimize("qa", rows, session="fl", params={"eval_chunk_size": 4}).get(timeout=60)
        time.sleep(1.0)  # the worker flushes its task events every 100 ms
    stages = {t["name"]: t for t in tasks.values() if str(t.get("name", "")).startswith("dspex.optimize.")}
    # Flower's list names what runs: one entry per stage, by stage
    for stage in ("load", "baseline", "compile", "candidate", "decide"):
        assert f"dspex.optimize.{stage}" in stages, sorted(stages)
    compile_task = stages["dspex.optimize.compile"]
    # the stage leads the kwargs; the result is the stage's news, not the kwargs again
    assert compile_task["kwargs"].startswith("{'stage': 'compile'"), compile_task["kwargs"]
    assert "'lm_calls':" in compile_task["result"] and "'run_id'" not in compile_task["result"]
    assert "'score': " in stages["dspex.optimize.decide"]["result"]
    assert str(summary["score"]) in stages["dspex.optimize.decide"]["result"]
    # while a stage runs, its progress is a readable line in the Result column
    lines = [e["result"] for e in progress if e.get("result")]
    assert any(line.startswith("compile") for line in lines), lines
    assert any("score" in line for line in lines), lines
