"""to_dspy(): a real dspy.Signature whose typed outputs DSPy's own adapters parse."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM

from dspex_tasks import Signature, errors, signature
from dspex_tasks.dsl.types import Entity
from dspex_tasks.programs.bridge import build_module

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
ANALYSIS_SPEC = (
    "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, entities: list[entity]"
)


def sig(spec: str, name: str = "bridge_test", **kwargs: Any) -> Signature:
    return signature(spec, name=name, register=False, **kwargs)


ANALYSIS = sig(ANALYSIS_SPEC, name="complex_analysis", instructions="Analyze the text.")
ADAPTERS = [pytest.param(dspy.ChatAdapter, id="chat"), pytest.param(dspy.JSONAdapter, id="json")]


def run(module: dspy.Module, answers: list[dict[str, Any]], adapter_cls: type[dspy.Adapter], **inputs: Any) -> Any:
    """Call ``module`` under dspy.context with a DummyLM answering in ``adapter_cls``'s format."""
    lm = DummyLM(answers, adapter=adapter_cls())
    with dspy.context(lm=lm, adapter=adapter_cls()):
        prediction = module(**inputs)
    assert lm.history, "the LM was never called"
    return prediction, lm


# -- the class -------------------------------------------------------------------------------------------------
def test_to_dspy_is_a_signature_subclass_with_typed_fields() -> None:
    cls = ANALYSIS.to_dspy()
    assert isinstance(cls, type) and issubclass(cls, dspy.Signature)
    assert list(cls.input_fields) == ["text", "context"]
    assert list(cls.output_fields) == ["analysis", "confidence", "entities"]
    assert cls.input_fields["text"].annotation is str
    assert cls.input_fields["context"].annotation == list[str]
    assert cls.output_fields["analysis"].annotation == list[str]
    assert cls.output_fields["confidence"].annotation is float
    assert cls.output_fields["entities"].annotation == list[Entity]
    assert cls.instructions == "Analyze the text."
    assert ANALYSIS.to_dspy() is cls  # built once


def test_confidence_keeps_its_bounds_and_a_description() -> None:
    field = ANALYSIS.to_dspy().output_fields["confidence"]
    bounds = {type(m).__name__: m for m in field.metadata}
    assert bounds["Ge"].ge == 0.0 and bounds["Le"].le == 1.0
    assert "0 and 1" in field.json_schema_extra["desc"]
    assert "reasoning" in ANALYSIS.to_dspy().output_fields["analysis"].json_schema_extra["desc"]


ANNOTATIONS = [
    ("str", str),
    ("int", int),
    ("float", float),
    ("bool", bool),
    ("embedding", list[float]),
    ("reasoning_chain", list[str]),
    ("entity", Entity),
    ("list[entity]", list[Entity]),
    ("dict[str, int]", dict[str, int]),
    ("dict", dict[str, Any]),
    ("any", Any),
    ("list[list[str]]", list[list[str]]),
    ('literal["a", "b"]', typing.Literal["a", "b"]),
    ("optional[str]", typing.Optional[str]),  # noqa: UP045 - compared with what the bridge builds
    ("str | int", typing.Union[str, int]),  # noqa: UP007
]


@pytest.mark.parametrize(("type_", "annotation"), ANNOTATIONS, ids=[t for t, _ in ANNOTATIONS])
def test_field_annotations(type_: str, annotation: Any) -> None:
    cls = sig(f"x: {type_} -> y: {type_}").to_dspy()
    assert cls.input_fields["x"].annotation == annotation
    assert cls.output_fields["y"].annotation == annotation


def test_default_instructions_name_the_fields() -> None:
    cls = sig("question: str -> answer: str").to_dspy()
    assert "question" in cls.instructions and "answer" in cls.instructions


def test_class_name_comes_from_the_signature_name() -> None:
    assert sig("a: str -> b: str", name="complex_analysis").to_dspy().__name__ == "ComplexAnalysis"
    assert sig("a: str -> b: str", name="ns.my-task").to_dspy().__name__.isidentifier()


def test_build_module_follows_the_module_kind() -> None:
    assert type(build_module(sig("a: str -> b: str"))) is dspy.Predict
    cot = build_module(sig("a: str -> b: str", module="chain_of_thought"))
    assert isinstance(cot, dspy.ChainOfThought)
    assert "reasoning" in cot.predict.signature.output_fields


# -- DSPy's adapters parse our types ---------------------------------------------------------------------------
ANALYSIS_ANSWER_TEXT = {
    "analysis": '["Paris is a city", "so the text is about travel"]',
    "confidence": "0.7",
    "entities": '[{"text": "Paris", "type": "LOC", "start": 0, "end": 5}, {"text": "Ada", "type": "PER"}]',
}
ANALYSIS_ANSWER_JSON = {
    "analysis": ["Paris is a city", "so the text is about travel"],
    "confidence": 0.7,
    "entities": [{"text": "Paris", "type": "LOC", "start": 0, "end": 5}, {"text": "Ada", "type": "PER"}],
}


def _check_analysis(pred: Any) -> None:
    assert pred.analysis == ["Paris is a city", "so the text is about travel"]
    assert isinstance(pred.confidence, float) and pred.confidence == 0.7
    assert [type(e) for e in pred.entities] == [Entity, Entity]
    assert pred.entities[0] == Entity(text="Paris", type="LOC", start=0, end=5)
    assert pred.entities[1].start is None
    outputs = ANALYSIS.validate_outputs({name: pred[name] for name in ANALYSIS.output_fields})
    assert outputs["entities"][1] == {"text": "Ada", "type": "PER", "start": None, "end": None}


@pytest.mark.parametrize("adapter_cls", ADAPTERS)
@pytest.mark.parametrize("answer", [ANALYSIS_ANSWER_TEXT, ANALYSIS_ANSWER_JSON], ids=["text", "values"])
def test_predict_parses_typed_outputs(adapter_cls: type[dspy.Adapter], answer: dict[str, Any]) -> None:
    pred, lm = run(dspy.Predict(ANALYSIS.to_dspy()), [answer], adapter_cls, text="Ada went to Paris.", context=["x"])
    _check_analysis(pred)
    prompt = "\n".join(str(m["content"]) for m in lm.history[-1]["messages"])
    assert "Analyze the text." in prompt
    assert "Ada went to Paris." in prompt


@pytest.mark.parametrize("adapter_cls", ADAPTERS)
def test_chain_of_thought_parses_typed_outputs(adapter_cls: type[dspy.Adapter]) -> None:
    module = dspy.ChainOfThought(ANALYSIS.to_dspy())
    answer = {"reasoning": "Paris is named first.", **ANALYSIS_ANSWER_TEXT}
    pred, _ = run(module, [answer], adapter_cls, text="Ada went to Paris.", context=[])
    assert pred.reasoning == "Paris is named first."
    _check_analysis(pred)


@pytest.mark.parametrize("adapter_cls", ADAPTERS)
def test_qa_confidence_string_becomes_a_float(adapter_cls: type[dspy.Adapter]) -> None:
    qa = sig("question: str -> answer: str, confidence: confidence_score", name="qa", instructions="Answer.")
    pred, _ = run(dspy.Predict(qa.to_dspy()), [{"answer": "x", "confidence": "0.7"}], adapter_cls, question="q?")
    assert pred.answer == "x"
    assert isinstance(pred.confidence, float) and pred.confidence == 0.7


@pytest.mark.parametrize("adapter_cls", ADAPTERS)
def test_literal_int_bool_and_optional_outputs(adapter_cls: type[dspy.Adapter]) -> None:
    s = sig('text: str, max_words: int -> label: literal["positive", "negative"], n: int, ok: bool, note: optional[str]')
    answer = {"label": "negative", "n": "12", "ok": "true", "note": "short"}
    pred, _ = run(dspy.Predict(s.to_dspy()), [answer], adapter_cls, text="bad", max_words=3)
    assert pred.label == "negative"
    assert pred.n == 12 and isinstance(pred.n, int)
    assert pred.ok is True
    assert pred.note == "short"
    assert s.validate_outputs({k: pred[k] for k in s.output_fields}) == {
        "label": "negative", "n": 12, "ok": True, "note": "short"
    }


def test_json_adapter_gives_none_for_a_null_optional() -> None:
    s = sig("text: str -> answer: str, note: optional[str]")
    pred, _ = run(dspy.Predict(s.to_dspy()), [{"answer": "a", "note": None}], dspy.JSONAdapter, text="t")
    assert pred.note is None


def test_a_label_outside_the_literal_fails_to_parse() -> None:
    s = sig('text: str -> label: literal["positive", "negative"]')
    lm = DummyLM([{"label": "maybe"}] * 3)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)), pytest.raises(Exception) as info:
        dspy.Predict(s.to_dspy())(text="x")
    assert "label" in str(info.value)


def test_build_module_runs_under_dspy_context() -> None:
    s = sig("text: str, context: list[str] -> analysis: reasoning_chain", module="chain_of_thought")
    pred, _ = run(build_module(s), [{"reasoning": "r", "analysis": '["a", "b"]'}], dspy.ChatAdapter, text="t", context=[])
    assert pred.analysis == ["a", "b"]


# -- every field name the DSL accepts works in DSPy --------------------------------------------------------------
# Names that are attributes of dspy.Signature / pydantic.BaseModel, or keyword arguments of Predict.__call__.
COLLIDING = ["fields", "input_fields", "output_fields", "model_config", "model_dump", "model_validate", "json",
             "copy", "schema", "dict", "prediction", "self", "new_signature"]


@pytest.mark.parametrize("name", COLLIDING)
@pytest.mark.parametrize("side", ["input", "output"])
def test_a_field_name_is_rejected_at_definition_or_works_in_dspy(name: str, side: str) -> None:
    # The contract: a bad spec fails at definition time with SignatureError, never later in to_dspy() or a worker.
    spec = f"q: str -> {name}: str" if side == "output" else f"{name}: str -> a: str"
    try:
        s = sig(spec)
    except errors.SignatureError as exc:
        assert name in str(exc)
        return
    inputs = {k: "v" for k in s.input_fields}
    answer = {k: "1" for k in s.output_fields}
    pred, _ = run(dspy.Predict(s.to_dspy()), [answer], dspy.ChatAdapter, **inputs)
    assert {k: pred[k] for k in s.output_fields} == answer


# -- no dspy on the client path --------------------------------------------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def test_importing_and_defining_signatures_does_not_import_dspy() -> None:
    code = (
        "import sys, dspex_tasks, jsonschema\n"
        "s = dspex_tasks.signature('a: str -> b: list[entity], c: confidence_score', name='z')\n"
        "s.validate_inputs({'a': 'x'}); s.validate_outputs({'b': [], 'c': '0.5'})\n"
        "for schema in (s.input_schema(), s.json_schema('openai')['json_schema']['schema'],\n"
        "               s.json_schema('anthropic')['input_schema'], s.describe()['output_schema']):\n"
        "    jsonschema.Draft202012Validator.check_schema(schema)\n"
        "assert 'dspy' not in sys.modules, 'dspy imported'\n"
        "s.to_dspy()\n"
        "assert 'dspy' in sys.modules\n"
        "print('ok')\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_importing_the_reference_signatures_does_not_import_dspy() -> None:
    done = _python("import sys, signatures\nassert 'dspy' not in sys.modules\nprint(len(signatures.ALL))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"
