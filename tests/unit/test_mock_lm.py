"""MockLM through DSPy's real modules, adapters and parsers."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import dspy
import jsonschema
import pytest

from dspex_tasks.dsl.signature import SignatureRegistry, registry, signature
from dspex_tasks.errors import LMError
from dspex_tasks.programs.bridge import build_module
from dspex_tasks.testing import mockgen
from dspex_tasks.testing.mock_lm import MockLM
from tests._values import plain as _plain

pytestmark = pytest.mark.unit

SPEC = (
    "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, "
    "entities: list[entity], label: literal['a','b'], ok: bool, count: int, score: float, meta: dict, "
    "groups: dict[str, list[int]], note: optional[str], either: int | str, blob: any, vec: embedding, "
    "weights: {:dict, {:literal, ['x', 'y']}, :float}, deep: list[dict[str, list[entity]]]"
)
INPUTS = {"text": "The quick brown fox.", "context": ["animals", "colors"]}




def _outputs(pred: dspy.Prediction, sig: Any) -> dict[str, Any]:
    return {k: _plain(pred[k]) for k in sig.output_fields}


def _check(pred: dspy.Prediction, sig: Any) -> dict[str, Any]:
    validated: dict[str, Any] = sig.validate_outputs(_outputs(pred, sig))
    jsonschema.Draft202012Validator(sig.output_schema()).validate(validated)
    return validated


@pytest.fixture(scope="module")
def sig() -> Any:
    return signature(SPEC, name="mock_lm_full", register=False)


@pytest.fixture(scope="module")
def reg(sig: Any) -> SignatureRegistry:
    r = SignatureRegistry()
    r.add(sig)
    return r


ADAPTERS = {"chat": lambda: dspy.ChatAdapter(use_json_adapter_fallback=False), "json": dspy.JSONAdapter}


@pytest.mark.parametrize("use_registry", [True, False], ids=["registry", "hints"])
@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought], ids=["predict", "cot"])
@pytest.mark.parametrize("adapter", list(ADAPTERS), ids=list(ADAPTERS))
def test_modules_and_adapters_give_valid_outputs(sig: Any, reg: SignatureRegistry, adapter: str, module: Any,
                                                 use_registry: bool) -> None:
    lm = MockLM(registry=reg if use_registry else SignatureRegistry())
    with dspy.context(lm=lm, adapter=ADAPTERS[adapter]()):
        pred = module(sig.to_dspy())(**INPUTS)
    _check(pred, sig)
    if module is dspy.ChainOfThought:
        assert isinstance(pred.reasoning, str) and pred.reasoning.startswith("mock-")
    assert lm.calls == 1


def test_build_module_with_default_registry() -> None:
    sig = signature("question: str -> answer: reasoning_chain, confidence: confidence_score",
                    name="mock_lm_registered", module="chain_of_thought")
    try:
        with dspy.context(lm=MockLM()):
            pred = build_module(sig)(question="Why is the sky blue?")
    finally:
        registry.remove(sig.name)
    assert 2 <= len(sig.validate_outputs(_outputs(pred, sig))["answer"]) <= 3  # typed from the registered signature


def test_deterministic(sig: Any, reg: SignatureRegistry) -> None:
    def run(lm: MockLM, inputs: dict[str, Any]) -> dict[str, Any]:
        with dspy.context(lm=lm):
            return _outputs(dspy.Predict(sig.to_dspy())(**inputs), sig)

    first = run(MockLM(registry=reg), INPUTS)
    assert run(MockLM(registry=reg), INPUTS) == first
    assert run(MockLM(registry=reg), {**INPUTS, "text": "Another sentence."}) != first
    assert run(MockLM(registry=reg, seed=7), INPUTS) != first


def test_cache_is_off_so_every_call_reaches_the_mock(sig: Any) -> None:
    lm = MockLM()
    with dspy.context(lm=lm):
        a = dspy.Predict(sig.to_dspy())(**INPUTS)
        b = dspy.Predict(sig.to_dspy())(**INPUTS)
    assert lm.calls == 2
    assert _outputs(a, sig) == _outputs(b, sig)


def test_scripted_dict_and_callable() -> None:
    sig = signature("question: str -> answer: str, confidence: confidence_score", name="mock_lm_qa", register=False)
    reg = SignatureRegistry()
    reg.add(sig)
    with dspy.context(lm=MockLM(registry=reg, scripted={"mock_lm_qa": {"answer": "Paris"}})):
        pred = dspy.Predict(sig.to_dspy())(question="Capital of France?")
    assert pred.answer == "Paris" and 0 <= pred.confidence < 1
    script = {"mock_lm_qa": lambda inputs: {"answer": f"echo: {inputs['question']}", "confidence": 0.5}}
    with dspy.context(lm=MockLM(registry=reg, scripted=script), adapter=dspy.JSONAdapter()):
        pred = dspy.Predict(sig.to_dspy())(question="hi")
    assert (pred.answer, pred.confidence) == ("echo: hi", 0.5)


def test_scripted_follows_demos() -> None:
    sig = signature("question: str -> answer: str", name="mock_lm_follow", register=False)
    reg = SignatureRegistry()
    reg.add(sig)
    predict = dspy.Predict(sig.to_dspy())
    predict.demos = [dspy.Example(question="2+2", answer="4"), dspy.Example(question="3+3", answer="6")]
    with dspy.context(lm=MockLM(registry=reg, scripted={"mock_lm_follow": mockgen.follow_demos})):
        assert predict(question="3+3").answer == "6"
        assert predict(question="5+5").answer.startswith("mock-")


def test_failure_rate(sig: Any) -> None:
    with dspy.context(lm=MockLM(failure_rate=1.0)), pytest.raises(LMError, match="mock LM injected failure"):
        dspy.Predict(sig.to_dspy())(**INPUTS)
    lm = MockLM(failure_rate=0.5, seed=3)
    outcomes = []
    with dspy.context(lm=lm):
        for i in range(40):
            try:
                dspy.Predict(sig.to_dspy())(**{**INPUTS, "text": f"t{i}"})
                outcomes.append(True)
            except LMError:
                outcomes.append(False)
    assert 5 < sum(outcomes) < 35
    assert lm.calls == 40
    with pytest.raises(ValueError):
        MockLM(failure_rate=1.5)


def test_latency(sig: Any) -> None:
    lm = MockLM(latency_ms=150)
    start = time.perf_counter()
    with dspy.context(lm=lm):
        dspy.Predict(sig.to_dspy())(**INPUTS)
    assert time.perf_counter() - start >= 0.15

    async def run() -> float:
        t0 = time.perf_counter()
        with dspy.context(lm=lm):
            await asyncio.gather(*(dspy.Predict(sig.to_dspy()).acall(**INPUTS) for _ in range(3)))
        return time.perf_counter() - t0

    assert asyncio.run(run()) >= 0.15
    assert lm.calls == 4


def test_async_outputs(sig: Any) -> None:
    async def run() -> dspy.Prediction:
        with dspy.context(lm=MockLM(), adapter=dspy.JSONAdapter()):
            return await dspy.ChainOfThought(sig.to_dspy()).acall(**INPUTS)

    _check(asyncio.run(run()), sig)


def test_usage_is_reported(sig: Any) -> None:
    with dspy.context(lm=MockLM(model="mock/usage")), dspy.track_usage() as tracker:
        dspy.Predict(sig.to_dspy())(**INPUTS)
    usage = tracker.get_total_tokens()["mock/usage"]
    assert usage["prompt_tokens"] > 100 and usage["completion_tokens"] > 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    with dspy.context(lm=MockLM(model="mock/usage"), track_usage=True):
        pred = dspy.Predict(sig.to_dspy())(**INPUTS)
    assert pred.get_lm_usage()["mock/usage"]["completion_tokens"] > 10


def test_thread_safety(sig: Any, reg: SignatureRegistry) -> None:
    lm = MockLM(registry=reg)
    with dspy.context(lm=lm):
        expected = _outputs(dspy.Predict(sig.to_dspy())(**INPUTS), sig)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for _ in range(n):
                with dspy.context(lm=lm):
                    results.append(_check(dspy.Predict(sig.to_dspy())(**INPUTS), sig))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(5,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert lm.calls == 41
    assert all(r == sig.validate_outputs(expected) for r in results) and len(results) == 40


def test_direct_calls() -> None:
    lm = MockLM()
    response = lm.forward(messages=[{"role": "user", "content": "hello"}])
    assert response.choices[0].message.content.startswith("mock-")
    assert response.usage["total_tokens"] > 0 and response.model == "mock/dspex"
    out = lm("hello")
    assert isinstance(out, list) and out[0] == response.choices[0].message.content
    assert len(lm.forward(prompt="x", n=3).choices) == 3
    restored = MockLM.load_state(MockLM(seed=4, latency_ms=2).dump_state())
    assert (restored.seed, restored.latency_ms) == (4, 2)
