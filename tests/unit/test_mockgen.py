"""The dspy-free mock generator: values, prompt parsing, answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dspy
import jsonschema
import pydantic
import pytest

from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.dsl.types import parse_type
from dspex_tasks.testing import mockgen
from tests._values import plain as _plain

pytestmark = pytest.mark.unit

ALL_TYPES = [
    "str", "int", "float", "bool", "any", "dict", "list", "embedding", "confidence_score", "probability",
    "reasoning_chain", "entity", ":string", ":integer", ":float", ":boolean", ":any", ":map", ":atom",
    ":embedding", ":confidence_score", ":probability", ":reasoning_chain", ":entity",
    "list[str]", "{:list, :integer}", "dict[str, float]", "{:dict, :string, :entity}", "optional[int]",
    "{:optional, :string}", "literal['red', 'green']", "{:literal, ['x', 'y', 'z']}", "int | str",
    "{:union, [:integer, {:list, :string}]}", "list[dict[str, list[entity]]]", "dict[literal['a', 'b'], embedding]",
    "{:list, {:dict, :string, :confidence_score}}", "optional[list[literal['p', 'q']]]",
    "list[int | entity | reasoning_chain]", "dict[str, optional[dict[str, list[bool]]]]", "list[:string]",
]
FULL_SPEC = (
    "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, "
    "entities: list[entity], label: literal['a','b'], ok: bool, n: int, f: float, d: dict, "
    "m: dict[str, list[int]], o: optional[str], u: int | str, a: any, e: embedding, "
    "lk: dict[literal['x','y'], float], nested: list[dict[str, list[entity]]]"
)
INPUTS = {"text": "hello\nworld", "context": ["c1", "c2"]}


def _messages(sig: Any, adapter: dspy.Adapter, inputs: dict[str, Any], demos: list[dict[str, Any]] | None = None,
              ) -> list[dict[str, Any]]:
    return adapter.format(sig, demos=demos or [], inputs=inputs)  # type: ignore[no-any-return]




@pytest.fixture()
def full_sig() -> Any:
    return signature(FULL_SPEC, name="mockgen_full", register=False)


@pytest.fixture()
def reg(full_sig: Any) -> SignatureRegistry:
    r = SignatureRegistry()
    r.add(full_sig)
    return r


# -- values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ALL_TYPES)
def test_value_for_every_type_is_valid(text: str) -> None:
    node = parse_type(text)
    sig = signature(f"q: str -> v: {text}", name="one_type", register=False)
    for i in range(8):
        value = mockgen.value_for(node, f"k{i}")
        assert json.loads(json.dumps(value)) == value  # plain JSON
        jsonschema.Draft202012Validator(node.json_schema()).validate(value)
        validated = sig.validate_outputs({"v": value})
        jsonschema.Draft202012Validator(sig.output_schema()).validate(validated)
        assert mockgen.value_for(node, f"k{i}") == value  # deterministic


def test_value_rules() -> None:
    keys = [f"key-{i}" for i in range(300)]
    strs = [mockgen.value_for(parse_type("str"), k) for k in keys]
    assert len(set(strs)) == len(strs)
    assert all(s.startswith("mock-") for s in strs)
    for k in keys[:60]:
        f = mockgen.value_for(parse_type("float"), k)
        assert isinstance(f, float) and 0.0 <= f < 1.0
        c = mockgen.value_for(parse_type("confidence_score"), k)
        assert 0.0 <= c < 1.0
        n = mockgen.value_for(parse_type("int"), k)
        assert isinstance(n, int) and not isinstance(n, bool) and n >= 0
        assert isinstance(mockgen.value_for(parse_type("bool"), k), bool)
        ent = mockgen.value_for(parse_type("entity"), k)
        assert set(ent) == {"text", "type", "start", "end"} and 0 <= ent["start"] <= ent["end"]
        emb = mockgen.value_for(parse_type("embedding"), k)
        assert 4 <= len(emb) <= 8 and all(isinstance(x, float) for x in emb)
        assert 2 <= len(mockgen.value_for(parse_type("reasoning_chain"), k)) <= 3
        assert 1 <= len(mockgen.value_for(parse_type("list[int]"), k)) <= 3
        assert 1 <= len(mockgen.value_for(parse_type("dict"), k)) <= 2
        assert mockgen.value_for(parse_type("optional[int]"), k) is not None
        assert mockgen.value_for(parse_type("literal['a', 'b']"), k) in ("a", "b")
        assert set(mockgen.value_for(parse_type("dict[literal['a', 'b'], int]"), k)) <= {"a", "b"}
    bools = {mockgen.value_for(parse_type("bool"), k) for k in keys}
    assert bools == {True, False}


def test_value_for_resolves_refs_in_pydantic_schemas() -> None:
    class Item(pydantic.BaseModel):
        name: str
        score: float = pydantic.Field(ge=2.0, le=3.0)
        tags: list[str] | None = None

    class Box(pydantic.BaseModel):
        items: list[Item]
        main: Item
        count: int = pydantic.Field(ge=10, le=12)

    schema = Box.model_json_schema()
    assert "$defs" in schema
    for i in range(10):
        value = mockgen.value_for(schema, f"box{i}")
        jsonschema.Draft202012Validator(schema).validate(value)
        box = Box.model_validate(value)
        assert box.main.tags is not None  # optional properties are filled in too
        assert 2.0 <= box.main.score <= 3.0 and 10 <= box.count <= 12


def test_value_for_schema_keywords() -> None:
    assert mockgen.value_for({"const": 7}, "k") == 7
    assert mockgen.value_for({"enum": ["a", None]}, "k") == "a"
    assert mockgen.value_for({"type": ["null", "integer"]}, "k") >= 0
    assert len(mockgen.value_for({"type": "array", "items": {"type": "string"}, "minItems": 5}, "k")) >= 5
    assert mockgen.value_for({"type": "object", "additionalProperties": False}, "k") == {}
    merged = mockgen.value_for({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}]}, "k")
    assert isinstance(merged["a"], int)
    recursive = {"$defs": {"N": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/N"}}}}},
                 "$ref": "#/$defs/N"}
    jsonschema.Draft202012Validator(recursive).validate(mockgen.value_for(recursive, "k"))


def test_mockgen_does_not_import_dspy() -> None:
    code = "import sys, dspex_tasks.testing.mockgen; assert 'dspy' not in sys.modules and 'litellm' not in sys.modules"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})


# -- prompt parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_parse_prompt(full_sig: Any, adapter: dspy.Adapter) -> None:
    demo = {"text": "demo text", "context": ["d1"], "label": "b", "ok": True, "n": 3}
    p = mockgen.parse_prompt(_messages(full_sig.to_dspy(), adapter, INPUTS, [demo]))
    assert p.adapter == ("json" if isinstance(adapter, dspy.JSONAdapter) else "chat")
    assert list(p.input_fields) == ["text", "context"]
    assert list(p.output_fields) == list(full_sig.output_fields)
    assert p.hints["confidence"] == {"type": "number"}
    assert p.hints["n"] == {"type": "integer"}
    assert p.hints["ok"] == {"type": "boolean"}
    assert p.hints["label"] == {"type": "string", "enum": ["a", "b"]}
    assert p.hints["o"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert p.hints["entities"]["type"] == "array" and "$defs" in p.hints["entities"]
    assert p.inputs == INPUTS
    assert "Respond with" not in p.inputs_text
    assert len(p.demos) == 1
    assert {k: p.demos[0][k] for k in demo} == demo


def test_message_text_accepts_content_parts() -> None:
    assert mockgen.message_text({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == "ab"
    assert mockgen.message_text({"role": "user", "content": None}) == ""


def test_str_inputs_stay_strings() -> None:
    sig = signature("text: str, k: int -> out: str", name="mockgen_strs", register=False)
    p = mockgen.parse_prompt(_messages(sig.to_dspy(), dspy.ChatAdapter(), {"text": "123", "k": 5}))
    assert p.inputs == {"text": "123", "k": 5}


# -- answers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_registry", [True, False], ids=["registry", "hints"])
@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_answer_round_trips_through_dspy_parsers(full_sig: Any, reg: SignatureRegistry, adapter: dspy.Adapter,
                                                  use_registry: bool) -> None:
    dsig = full_sig.to_dspy()
    msgs = _messages(dsig, adapter, INPUTS)
    text = mockgen.answer(msgs, registry=reg if use_registry else SignatureRegistry())
    if isinstance(adapter, dspy.JSONAdapter):
        jsonschema.Draft202012Validator(full_sig.output_schema()).validate(json.loads(text))
    else:
        assert text.rstrip().endswith("[[ ## completed ## ]]")
    parsed = adapter.parse(dsig, text)
    validated = full_sig.validate_outputs(_plain(parsed))
    jsonschema.Draft202012Validator(full_sig.output_schema()).validate(validated)
    if use_registry:  # reasoning_chain from the signature's own type: 2-3 steps
        assert 2 <= len(validated["analysis"]) <= 3


def test_answer_is_deterministic_and_keyed_on_inputs(full_sig: Any, reg: SignatureRegistry) -> None:
    dsig = full_sig.to_dspy()
    chat = dspy.ChatAdapter()
    a1 = mockgen.answer(_messages(dsig, chat, INPUTS), registry=reg)
    a2 = mockgen.answer(_messages(dsig, chat, INPUTS), registry=reg)
    other = mockgen.answer(_messages(dsig, chat, {**INPUTS, "text": "other"}), registry=reg)
    reseeded = mockgen.answer(_messages(dsig, chat, INPUTS), registry=reg, seed=1)
    assert a1 == a2
    assert a1 != other and a1 != reseeded
    out1 = chat.parse(dsig, a1)
    out2 = dspy.JSONAdapter().parse(dsig, mockgen.answer(_messages(dsig, dspy.JSONAdapter(), INPUTS), registry=reg))
    assert _plain(out1) == _plain(out2)  # the same inputs give the same values under either adapter


def test_plain_prompt_gets_text() -> None:
    text = mockgen.answer([{"role": "user", "content": "hello"}])
    assert text.startswith("mock-") and text == mockgen.answer([{"role": "user", "content": "hello"}])


def test_scripted_dict_and_callable() -> None:
    sig = signature("question: str -> answer: str, score: confidence_score", name="mockgen_qa", register=False)
    reg = SignatureRegistry()
    reg.add(sig)
    msgs = _messages(sig.to_dspy(), dspy.ChatAdapter(), {"question": "why?"})
    out = dspy.ChatAdapter().parse(sig.to_dspy(), mockgen.answer(msgs, registry=reg, scripted={"mockgen_qa": {"answer": "42"}}))
    assert out["answer"] == "42" and 0 <= out["score"] < 1
    seen: list[dict[str, Any]] = []

    def script(inputs: dict[str, Any]) -> dict[str, Any]:
        seen.append(inputs)
        return {"answer": inputs["question"].upper(), "score": 0.25, "unknown": 1}

    text = mockgen.answer(msgs, registry=reg, scripted={"mockgen_qa": script})
    assert dspy.ChatAdapter().parse(sig.to_dspy(), text) == {"answer": "WHY?", "score": 0.25}
    assert seen == [{"question": "why?"}]
    wildcard = mockgen.answer(msgs, registry=SignatureRegistry(), scripted={"*": {"answer": "any"}})
    assert dspy.ChatAdapter().parse(sig.to_dspy(), wildcard)["answer"] == "any"
    with pytest.raises(TypeError, match="dict of outputs"):
        mockgen.answer(msgs, registry=reg, scripted={"mockgen_qa": lambda i: ["nope"]})  # type: ignore[dict-item,return-value]


def test_scripted_callable_receives_demos() -> None:
    sig = signature("question: str -> answer: str", name="mockgen_demo", register=False)
    reg = SignatureRegistry()
    reg.add(sig)
    demos = [{"question": "2+2", "answer": "4"}, {"question": "3+3", "answer": "6"}]
    got: list[Any] = []

    def script(inputs: dict[str, Any], demos: list[dict[str, Any]]) -> dict[str, Any]:
        got.append(demos)
        return mockgen.follow_demos(inputs, demos)

    for adapter in (dspy.ChatAdapter(), dspy.JSONAdapter()):
        msgs = _messages(sig.to_dspy(), adapter, {"question": "3+3"}, demos)
        assert adapter.parse(sig.to_dspy(), mockgen.answer(msgs, registry=reg, scripted={"mockgen_demo": script})) == {"answer": "6"}
        assert got[-1] == demos
    msgs = _messages(sig.to_dspy(), dspy.ChatAdapter(), {"question": "9+9"}, demos)
    unmatched = dspy.ChatAdapter().parse(sig.to_dspy(), mockgen.answer(msgs, registry=reg, scripted={"*": script}))
    assert unmatched["answer"].startswith("mock-")


def test_registry_match_uses_instructions_to_disambiguate() -> None:
    a = signature("q: str -> a: str", name="mockgen_a", instructions="Answer briefly.", register=False)
    b = signature("q: str -> a: str", name="mockgen_b", instructions="Answer at length.", register=False)
    c = signature("q: str -> a: int", name="mockgen_c", register=False)  # same names, other type
    reg = SignatureRegistry()
    for s in (a, b, c):
        reg.add(s)
    for s in (a, b):
        p = mockgen.parse_prompt(_messages(s.to_dspy(), dspy.ChatAdapter(), {"q": "x"}))
        assert mockgen.match_signature(p, reg) is s
    p = mockgen.parse_prompt(_messages(c.to_dspy(), dspy.ChatAdapter(), {"q": "x"}))
    assert mockgen.match_signature(p, reg) is c
    cot = dspy.ChainOfThought(a.to_dspy())
    p = mockgen.parse_prompt(_messages(cot.predict.signature, dspy.ChatAdapter(), {"q": "x"}))
    assert "reasoning" in p.output_fields and mockgen.match_signature(p, reg) is a


def test_answer_for_schema() -> None:
    sig = signature("q: str -> ents: list[entity], c: confidence_score, tag: optional[str]", name="mockgen_rf",
                    register=False)
    schema = sig.json_schema("openai")["json_schema"]["schema"]
    msgs = [{"role": "user", "content": "[[ ## q ## ]]\nhi"}]
    text = mockgen.answer_for_schema(msgs, schema, seed=3)
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema).validate(value)
    sig.validate_outputs(value)
    assert text == mockgen.answer_for_schema(msgs, schema, seed=3)
    assert text != mockgen.answer_for_schema(msgs, schema, seed=4)


def test_token_counts() -> None:
    assert mockgen.count_tokens("") == 1
    assert mockgen.count_tokens("x" * 400) == 101
    msgs = [{"role": "system", "content": "a" * 40}, {"role": "user", "content": "b" * 8}]
    assert mockgen.prompt_tokens(msgs) == 11 + 3
