"""Per-request options inside the worker, without Redis: the trace as JSON, and lm_config through the governed LM."""

from __future__ import annotations

import datetime
import math
from typing import Any

import dspy
import pydantic
import pytest

from dspex_tasks.lm.governed import GovernedLM, Route
from dspex_tasks.lm.usage import task_usage
from dspex_tasks.testing.mock_lm import MockLM
from dspex_tasks.worker.trace import json_safe, trace_entries

pytestmark = pytest.mark.unit

MSGS = [{"role": "user", "content": "hello"}]


class Person(pydantic.BaseModel):
    name: str
    born: datetime.date


def test_trace_values_are_json_safe() -> None:
    value = {"who": Person(name="Ada", born=datetime.date(1815, 12, 10)), "n": math.inf, 3: (1, {2}),
             "obj": object, "example": dspy.Example(question="q")}
    safe = json_safe(value)
    assert safe["who"] == {"name": "Ada", "born": "1815-12-10"}
    assert safe["n"] == "inf" and safe["3"] == [1, [2]] and safe["obj"] == str(object)
    assert safe["example"] == {"question": "q"}


def test_trace_names_predictors_as_the_module_does_even_when_a_copy_ran() -> None:
    class Two(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = dspy.ChainOfThought("question -> draft")
            self.second = dspy.Predict("draft -> answer")

    module = Two()
    copy = module.deepcopy()  # what Refine and BestOfN run
    pred = dspy.Prediction(reasoning="because", draft="d")
    stranger = dspy.Predict("x -> y")
    trace: list[tuple[Any, Any, Any]] = [
        (module.first.predict, {"question": "q"}, pred), (copy.second, {"draft": "d"}, dspy.Prediction(answer="a")),
        (stranger, {"x": "1"}, dspy.Prediction(y="2"))]
    entries = trace_entries(module, trace)
    assert [e["predictor"] for e in entries] == ["first.predict", "second", "StringSignature"]
    assert entries[0] == {"predictor": "first.predict", "inputs": {"question": "q"},
                          "outputs": {"reasoning": "because", "draft": "d"}}


def test_lm_config_travels_through_the_governed_lm_and_keys_its_cache() -> None:
    class DictCache:
        def __init__(self) -> None:
            self.entries: dict[str, dict[str, Any]] = {}

        def get(self, digest: str) -> dict[str, Any] | None:
            return self.entries.get(digest)

        def put(self, digest: str, entry: dict[str, Any]) -> None:
            self.entries[digest] = entry

    inner = MockLM()
    cache = DictCache()
    lm = GovernedLM(Route(("mock",)), {"mock": inner}, shared_cache=cache)  # type: ignore[arg-type]
    tuned = lm.copy(temperature=0.3, max_tokens=50)
    with task_usage("qa", None) as spent:
        tuned.forward(messages=MSGS)
        lm.forward(messages=MSGS)  # other settings: another cache entry, another provider call
        tuned.forward(messages=MSGS)  # the same settings: served from the cache
    assert inner.calls == 2 and len(cache.entries) == 2
    assert inner.requests[0]["temperature"] == 0.3 and inner.requests[0]["max_tokens"] == 50
    assert inner.requests[1]["temperature"] == 0.0 and inner.requests[1]["max_tokens"] == 4000
    assert [cached for _, _, cached in spent.calls] == [False, False, True]  # usage recorded for each call
    assert tuned.limiter is lm.limiter and tuned.shared_cache is lm.shared_cache
