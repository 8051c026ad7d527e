"""GEPA runs on a real Redis with an in-process worker: the mock LM follows a rule once instructions state it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks.optimize.metrics import metric
from dspex_tasks.optimize.runs import RunStore
from dspex_tasks.testing.mockgen import RULE_TEXT, rule_answer

pytestmark = pytest.mark.redis


@metric("rule_feedback")
def rule_feedback(example: Any, prediction: Any, trace: Any = None) -> dict[str, Any]:
    """Exact match, with feedback that states the rule the labels follow."""
    ok = prediction["answer"] == example["answer"]
    return {"score": float(ok), "feedback": "Correct." if ok else f"{RULE_TEXT} Expected {example['answer']!r}."}


def labelled(n: int, prefix: str = "question") -> list[dict[str, Any]]:
    return [{"question": f"{prefix} {i}", "answer": rule_answer({"question": f"{prefix} {i}"})} for i in range(n)]


@pytest.fixture
def gepa_app(settings: Any, signatures: Any) -> Iterator[Any]:
    """A worker serving both queues; its mock LM follows the rule once a predictor's instructions state it."""
    from dspex_tasks.testing.plugin import in_process_worker
    from dspex_tasks.worker.app import create_worker_app

    s = settings.model_copy(update={"mock_scenario": "learns_from_instructions", "mock_latency_ms": 2,
                                    "reflection_lm": "openai/gpt-4o-mini"})  # as DSPEX_REFLECTION_LM sets it
    app = create_worker_app(s, signatures=signatures, import_modules=False)
    with in_process_worker(app, concurrency=12, queues=[s.predict_queue, s.optimize_queue]):
        yield app


@pytest.fixture
def gclient(gepa_app: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=gepa_app.dspex_settings)
    yield c
    c.close()


def test_gepa_run_promotes_and_reports_candidate_scores(gclient: Any) -> None:
    # Given a session serving the base program, and a metric whose feedback states the labels' rule
    assert gclient.submit("qa", {"question": "abc"}, session="g1").get(timeout=20).program_version == 0
    # When a GEPA run with a small budget finishes
    run = gclient.optimize("qa", labelled(8), valset=labelled(6, "held out"), metric="rule_feedback",
                           optimizer="gepa", session="g1", params={"max_metric_calls": 40, "eval_chunk_size": 3})
    summary = run.get(timeout=60)
    # Then the candidate beat the baseline and was promoted; its trials are the candidates' valset scores
    assert summary["promoted"] is True and (summary["baseline_score"], summary["score"]) == (0.0, 1.0)
    assert summary["trials"] == [0.0, 1.0]
    # And the events name each candidate GEPA scored, with its score, while compiling
    events = list(run.events(timeout=5))
    scored = [e for e in events if e["stage"] == "compile" and "candidate" in e]
    assert [(e["candidate"], e["score"]) for e in scored] == [(0, 0.0), (1, 1.0)]
    assert all(e["metric_calls"] <= 40 and e["total"] > 0 for e in scored)
    assert "candidate 1 (from 0) scored 1.0000 on the valset, best so far" in scored[1]["message"]
    # And the promoted program states the rule, so the session now answers by it
    state = run.candidate()
    assert RULE_TEXT in str(state) and gclient.programs.current_version("g1", "qa") == 1
    deadline = time.time() + 5  # the worker's program cache catches up with the promotion
    while (res := gclient.submit("qa", {"question": "fresh"}, session="g1").get(timeout=20)).program_version != 1:
        assert time.time() < deadline
    assert res.outputs["answer"] == rule_answer({"question": "fresh"})
    # And GEPA's state was kept as JSON in the run's checkpoint: the budget spent, the iterations run
    saved = RunStore(redis=gclient.redis, namespace=gclient.settings.namespace).checkpoint(run.id, "compile:gepa_state")
    assert saved["format"] == 1 and 40 <= saved["total_num_evals"] <= 46 and saved["iteration"] >= 2
    assert saved["state"]["program_candidates"][1]["self"].startswith("Answer the question.")
    # Reflection and program runs went through the governed LM: all counted in the run's LM calls
    assert summary["lm_calls"] >= 40 + 1 + 2 * 6


def test_named_reflection_model_is_the_configured_mock(gclient: Any) -> None:
    # Given DSPEX_LM=mock, a reflection model named in params is that mock too (no provider is ever called)
    run = gclient.optimize("qa", labelled(6), valset=labelled(4, "v"), metric="rule_feedback", optimizer="gepa",
                           params={"max_metric_calls": 16, "reflection_lm": "openai/gpt-4o-mini",
                                   "use_merge": False})
    summary = run.get(timeout=60)
    assert summary["score"] == 1.0 and summary["dry_run"] is True
    # A model the fleet is not configured for is refused: a client never picks what the worker's keys pay for
    from dspex_tasks import errors

    run = gclient.optimize("qa", labelled(6), valset=labelled(4, "v"), metric="rule_feedback", optimizer="gepa",
                           params={"max_metric_calls": 16, "reflection_lm": "anthropic/claude-opus-4"})
    with pytest.raises(errors.ValidationError) as info:
        run.get(timeout=60)
    assert info.value.errors[0]["field"] == "params.reflection_lm" and "DSPEX_REFLECTION_LM" in str(info.value)


def test_float_metric_gets_generic_feedback_and_bad_budgets_are_refused_early(gclient: Any) -> None:
    from dspex_tasks import errors

    # exact_match returns a number: GEPA still runs (generic feedback does not state the rule: no gain)
    summary = gclient.optimize("qa", labelled(6), valset=labelled(4, "v"), optimizer="gepa", session="g3",
                               params={"max_metric_calls": 12}).get(timeout=60)
    assert summary["promoted"] is False and summary["score"] == summary["baseline_score"] == 0.0
    # two budgets: refused by the client before anything is enqueued, naming the second one
    with pytest.raises(errors.ValidationError) as info:
        gclient.optimize("qa", labelled(6), optimizer="gepa", params={"auto": "light", "max_metric_calls": 9})
    assert info.value.errors[0]["field"] == "params.max_metric_calls"
    assert len(gclient.runs.ids()) == 1


def _fanned(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["stage"] == "compile" and "chunks" in e]


def test_candidate_scoring_fans_out_over_workers_with_the_same_scores(gclient: Any) -> None:
    # GEPA scores each candidate on the whole valset: 8 rows in chunks of 2 are 4 compile chunks per candidate
    common = {"max_metric_calls": 40, "eval_chunk_size": 2, "use_merge": False}
    runs = {fan: gclient.optimize("qa", labelled(6), valset=labelled(8, "held out"), metric="rule_feedback",
                                  optimizer="gepa", params={**common, "fanout": fan}) for fan in (True, False)}
    summaries = {fan: run.get(timeout=90) for fan, run in runs.items()}
    # Then the run that fanned out found what the one scoring in its own threads found
    assert summaries[True]["trials"] == summaries[False]["trials"] == [0.0, 1.0]
    assert summaries[True]["score"] == summaries[False]["score"] == 1.0
    fanned = _fanned(list(runs[True].events(timeout=5)))
    # the seed is re-scored by GEPA itself on the valset, then each candidate: every one as 4 chunks, taken by the
    # worker's other threads (chunks an idle fleet starts within fanout_wait_s)
    assert fanned and all(e["chunks"] == 4 for e in fanned), fanned
    assert sum(e["chunks_elsewhere"] for e in fanned) >= 1, fanned
    assert not _fanned(list(runs[False].events(timeout=5)))
    # and the chunks' LM calls are the run's: both runs counted about the same
    calls = {fan: s["lm_calls"] for fan, s in summaries.items()}
    assert abs(calls[True] - calls[False]) <= 2, calls


@pytest.fixture
def busy_client(settings: Any, signatures: Any) -> Iterator[Any]:
    """One worker thread in all: while the compile stage holds it, no fanned-out chunk can start anywhere."""
    from dspex_tasks.client import Client
    from dspex_tasks.testing.plugin import running_worker

    s = settings.model_copy(update={"mock_scenario": "learns_from_instructions", "mock_latency_ms": 2,
                                    "reflection_lm": "openai/gpt-4o-mini"})
    with running_worker(s, signatures=signatures, concurrency=1):
        c = Client(settings=s)
        yield c
        c.close()


def test_a_fleet_with_no_free_slot_never_deadlocks_the_compile_stage(busy_client: Any) -> None:
    run = busy_client.optimize("qa", labelled(6), valset=labelled(6, "held out"), metric="rule_feedback",
                               optimizer="gepa", params={"max_metric_calls": 30, "eval_chunk_size": 2,
                                                         "use_merge": False, "fanout_wait_s": 0.3})
    summary = run.get(timeout=90)
    assert summary["score"] == 1.0
    fanned = _fanned(list(run.events(timeout=5)))
    # every chunk waited its 0.3 s, was claimed by the compile stage and ran there; the queued copies then skip
    assert fanned and all(e["chunks_elsewhere"] == 0 for e in fanned), fanned
