"""Decisions made from types, not text, and one runner for every module call (real Redis, in-process worker)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dspex_tasks import errors, wire
from dspex_tasks.lm.usage import usage_report
from dspex_tasks.testing.mock_lm import MockLM
from dspex_tasks.testing.mockgen import rule_answer

pytestmark = pytest.mark.redis


class FailingFirst(MockLM):
    """A mock LM that raises ``errors`` in order, then answers."""

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__()
        self.failures = list(failures)
        self.lock = threading.Lock()

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        with self.lock:
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            self._start()  # counted as a call
            raise failure
        return super().forward(prompt=prompt, messages=messages, **kwargs)


def serve_with(worker_app: Any, lm: MockLM) -> None:
    runtime = worker_app.runtime
    runtime._lms = {key: [lm] for key in runtime._lms} or {"mock": [lm]}


def test_a_retryable_lm_error_is_retried_by_its_class(worker_app: Any, client: Any) -> None:
    # Given an LM that fails twice with a server error whose text names no error class
    lm = FailingFirst([errors.LMServerError("upstream hiccup"), errors.LMServerError("upstream hiccup")])
    serve_with(worker_app, lm)
    # When a job runs, Then the task retries (twice, 1 s then 2 s) and succeeds
    res = client.submit("qa", {"question": "retry me"}).get(timeout=30)
    assert res.outputs["answer"] and lm.calls == 3


def test_a_non_retryable_error_fails_at_once_whatever_its_text_says(worker_app: Any, client: Any) -> None:
    # Given an LM failing with a plain LMError whose message looks like a retryable provider error
    lm = FailingFirst([errors.LMError("LM call failed (RateLimitError): auth rejected")] * 5)
    serve_with(worker_app, lm)
    # When a job runs, Then it fails at once as that class: the message text decides nothing
    with pytest.raises(errors.LMError, match="auth rejected") as info:
        client.submit("qa", {"question": "no retry"}).get(timeout=30)
    assert type(info.value) is errors.LMError and lm.calls == 1


def test_a_provider_retry_after_sets_the_task_countdown(worker_app: Any, client: Any) -> None:
    lm = FailingFirst([errors.LMRateLimitError("429", 3.0)])
    serve_with(worker_app, lm)
    t0 = time.monotonic()
    assert client.submit("qa", {"question": "wait for it"}).get(timeout=30).outputs
    assert time.monotonic() - t0 >= 2.9 and lm.calls == 2  # waited the provider's 3 s, not the 1 s backoff


def test_optimization_lm_spend_reaches_usage(opt_app: Any, settings: Any) -> None:
    from dspex_tasks.client import Client

    rows = [{"question": f"q {i}", "answer": rule_answer({"question": f"q {i}"})} for i in range(16)]
    with Client(settings=opt_app.dspex_settings) as client:
        # Given no prediction was ever served in the session, When an optimization run finishes
        summary = client.optimize("qa", rows, session="spend", params={"eval_chunk_size": 4}).get(timeout=60)
        opt_app.runtime.ledger.flush()
        report = usage_report(client.redis, settings.namespace, session="spend")
    # Then its LM calls (evaluations and the optimizer's own, from its threads) are in the session's usage
    assert summary["lm_calls"] > 0
    (row,) = [r for r in report if r["signature"] == "qa"]
    assert row["lm_calls"] >= summary["lm_calls"] and row["prompt_tokens"] > 0
    assert row["tasks"] == 0  # spend, not predictions


def test_an_unknown_stage_is_refused_by_the_dispatch_table(opt_app: Any) -> None:
    r = opt_app.send_task(wire.STAGE_TASK, kwargs={"run_id": "r-unknown", "stage": "evaluate_everything"},
                          queue=opt_app.dspex_settings.optimize_queue)
    with pytest.raises(Exception, match="unknown stage 'evaluate_everything'"):
        r.get(timeout=20)


def test_a_cancelled_run_raises_cancelled(opt_app: Any) -> None:
    from dspex_tasks.client import Client

    rows = [{"question": f"q {i}", "answer": "a"} for i in range(40)]
    with Client(settings=opt_app.dspex_settings) as client:
        run = client.optimize("qa", rows, session="c1", params={"eval_chunk_size": 2})
        run.cancel()
        with pytest.raises(errors.Cancelled, match="cancelled"):
            run.get(timeout=60)
        with pytest.raises(errors.RunNotFound):
            client.run("0" * 32)  # well-formed, unknown (a malformed id is InvalidId)
