"""Per-request options (ARCHITECTURE 3.6) end to end: real Redis, an in-process worker, the in-process MockLM."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from dspex_tasks import errors
from dspex_tasks.client import Job
from dspex_tasks.dsl.signature import Signature, SignatureRegistry, parse_spec, signature

pytestmark = pytest.mark.redis


class TwoStep(dspy.Module):
    """Two predictors, called in order: a ChainOfThought draft, then a Predict that answers from it."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.ChainOfThought("question -> draft")
        self.polish = dspy.Predict("question, draft -> answer")

    def forward(self, question: str) -> Any:
        draft = self.draft(question=question).draft
        return self.polish(question=question, draft=draft)


@pytest.fixture
def signatures() -> SignatureRegistry:
    """This module's own: a Predict signature, a ChainOfThought one, and a two-predictor program built by hand."""
    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str, confidence: confidence_score", name="qa", register=False))
    reg.add(signature("question: str -> answer: str", name="cot_qa", module="chain_of_thought", register=False))
    inputs, outputs = parse_spec("question: str -> answer: str")
    reg.add(Signature("two_step", inputs, outputs, instructions=None, module="program", desc=None, kind="program",
                      factory=TwoStep, origin=f"{__name__}:TwoStep"))
    return reg


def test_trace_carries_chain_of_thought_reasoning(client: Any) -> None:
    # Given a ChainOfThought signature, when a job asks for its trace
    res = client.submit("cot_qa", {"question": "Why is the sky blue?"}, trace=True).get(timeout=20)
    # Then the one predictor call is there, named as DSPy names it, with its reasoning and answer
    assert [call["predictor"] for call in res.trace] == ["predict"]
    call = res.trace[0]
    assert call["inputs"] == {"question": "Why is the sky blue?"}
    assert isinstance(call["outputs"]["reasoning"], str) and call["outputs"]["reasoning"]
    assert call["outputs"]["answer"] == res.outputs["answer"]
    # And without trace there is none
    assert client.submit("cot_qa", {"question": "Why is the sky blue?"}).get(timeout=20).trace is None


def test_trace_of_a_two_predictor_module_lists_both_calls_in_order(client: Any) -> None:
    res = client.submit("two_step", {"question": "What is DSPy?"}, trace=True).get(timeout=20)
    assert [call["predictor"] for call in res.trace] == ["draft.predict", "polish"]
    draft, polish = res.trace
    assert set(draft["outputs"]) == {"reasoning", "draft"}
    assert polish["inputs"] == {"question": "What is DSPy?", "draft": draft["outputs"]["draft"]}
    assert polish["outputs"]["answer"] == res.outputs["answer"]
    assert res.usage["total_tokens"] > 0


def test_lm_config_reaches_every_lm_call_of_the_job(client: Any, worker_app: Any, signatures: Any) -> None:
    runtime = worker_app.runtime
    mock = runtime.lm_for(signatures.get("qa"))  # the in-process MockLM (no cache, no limits: not governed)
    before = len(mock.requests)
    res = client.submit("qa", {"question": "q"}, lm_config={"temperature": 0.3, "max_tokens": 50}).get(timeout=20)
    assert res.usage["total_tokens"] > 0
    [params] = mock.requests[before:]
    assert params["temperature"] == 0.3 and params["max_tokens"] == 50
    # the LM's own settings are back for the next job
    client.submit("qa", {"question": "q"}).get(timeout=20)
    assert mock.requests[-1]["temperature"] == 0.0 and mock.requests[-1]["max_tokens"] == 4000
    # a program's LM is governed (every call recorded): both predictors get the settings, usage still counts
    governed = runtime.lm_for(signatures.get("two_step"), recorded=True)
    inner = governed.inners["mock"]
    before = len(inner.requests)
    res = client.submit("two_step", {"question": "q"}, lm_config={"temperature": 0.7, "top_p": 0.5,
                                                                  "rollout_id": "r1"}).get(timeout=20)
    calls = inner.requests[before:]
    assert len(calls) == 2
    assert all(c["temperature"] == 0.7 and c["top_p"] == 0.5 and c["rollout_id"] == "r1" for c in calls)
    assert res.usage["total_tokens"] > 0 and res.lm == "mock/dspex"


def test_map_applies_options_to_every_item(client: Any) -> None:
    results = client.map("cot_qa", [{"question": f"q{i}"} for i in range(5)], trace=True,
                         lm_config={"max_tokens": 64})
    assert [r.trace[0]["inputs"]["question"] for r in results] == [f"q{i}" for i in range(5)]


def test_options_are_checked_before_enqueueing_and_again_by_the_worker(client: Any, worker_app: Any) -> None:
    with pytest.raises(errors.ValidationError) as info:
        client.submit("qa", {"question": "q"}, lm_config={"api_base": "http://attacker", "temperature": 5})
    assert {e["field"] for e in info.value.errors} == {"options.lm_config.api_base", "options.lm_config.temperature"}
    assert "options.lm_config.api_base: not allowed; allowed: max_tokens, n, rollout_id, temperature, top_p" \
        in info.value.message
    assert int(client.redis.llen(client.settings.predict_queue)) == 0
    # a bare sender that skips the client: the worker refuses the option, typed
    r = worker_app.send_task("dspex.qa", kwargs={"inputs": {"question": "q"}, "options": {"lm_config": {
        "api_key": "sk-x"}}})
    with pytest.raises(errors.ValidationError) as info:
        Job(r).get(timeout=20)
    assert info.value.errors[0]["field"] == "options.lm_config.api_key"
    r = worker_app.send_task("dspex.map", kwargs={"signature": "qa", "items": [{"question": "q"}],
                                                  "options": {"trace": "yes"}})
    with pytest.raises(errors.ValidationError, match="options.trace"):
        Job(r).get(timeout=20)
    # and a message with no options at all is served as before
    r = worker_app.send_task("dspex.qa", kwargs={"inputs": {"question": "q"}})
    assert "trace" not in r.get(timeout=20)
