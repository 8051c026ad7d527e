"""JSON Schemas: generic 2020-12, OpenAI strict response_format, Anthropic tool."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspex_tasks import Signature, errors, signature

pytestmark = pytest.mark.unit

Validator = jsonschema.Draft202012Validator

# Keywords OpenAI's strict structured outputs accept (its guide), written out here rather than imported so a
# keyword slipping into the library's own list does not pass silently.
STRICT_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
        "description", "title", "$defs", "$ref", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "multipleOf", "pattern", "format", "minItems", "maxItems",
    }
)


def sig(spec: str, name: str = "schema_test", **kwargs: Any) -> Signature:
    return signature(spec, name=name, register=False, **kwargs)


def checked(schema: dict[str, Any]) -> Validator:
    """The validator for ``schema``, after checking the schema itself against the 2020-12 metaschema."""
    Validator.check_schema(schema)
    return Validator(schema)


def assert_strict(schema: Any, path: str = "$") -> None:
    """OpenAI strict rules at every nesting level."""
    assert isinstance(schema, dict), f"{path}: a schema must be an object, got {schema!r}"
    assert schema, f"{path}: an empty schema (free-form JSON) is not allowed in strict mode"
    unsupported = set(schema) - STRICT_KEYWORDS
    assert not unsupported, f"{path}: unsupported keywords {sorted(unsupported)}"
    kinds = schema.get("type")
    assert "anyOf" in schema or "$ref" in schema or "enum" in schema or "const" in schema or kinds, (
        f"{path}: no type in {schema!r}"
    )
    for i, member in enumerate(schema.get("anyOf", [])):
        assert_strict(member, f"{path}.anyOf[{i}]")
    if kinds == "object" or (isinstance(kinds, list) and "object" in kinds):
        assert schema.get("additionalProperties") is False, f"{path}: additionalProperties must be false"
        props = schema.get("properties")
        assert isinstance(props, dict), f"{path}: an object needs fixed properties"
        assert isinstance(schema.get("required"), list), f"{path}: required missing"
        assert sorted(schema["required"]) == sorted(props), f"{path}: required must list every property"
        assert len(set(schema["required"])) == len(schema["required"]), f"{path}: repeated required"
        for name, sub in props.items():
            assert_strict(sub, f"{path}.{name}")
    if kinds == "array":
        assert "items" in schema, f"{path}: arrays need items"
        assert_strict(schema["items"], f"{path}[]")
    for name, sub in schema.get("$defs", {}).items():
        assert_strict(sub, f"{path}.$defs.{name}")


BROKEN_STRICT = [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": [], "additionalProperties": False},
    {"type": "object", "additionalProperties": False, "required": []},
    {"type": "object", "properties": {"a": {}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object", "properties": {"b": {
        "type": "string"}}, "required": [], "additionalProperties": False}}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {"a": {"anyOf": [{"type": "object", "properties": {}, "required": []}]}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 1}}, "required": ["a"],
     "additionalProperties": False},
]


@pytest.mark.parametrize("schema", BROKEN_STRICT)
def test_the_strict_checker_catches_violations(schema: dict[str, Any]) -> None:
    with pytest.raises(AssertionError):
        assert_strict(schema)


def accepts_null(schema: dict[str, Any]) -> bool:
    return Validator(schema).is_valid(None)


# -- signatures used below, with good and bad outputs ----------------------------------------------------------
CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = [
    (
        "question: str -> answer: str, confidence: confidence_score",
        [{"answer": "Paris", "confidence": 0.9}, {"answer": "", "confidence": 0}, {"answer": "x", "confidence": 1}],
        [
            {"answer": "Paris"},
            {"answer": "Paris", "confidence": 1.2},
            {"answer": "Paris", "confidence": -0.1},
            {"answer": 3, "confidence": 0.5},
            {"answer": "Paris", "confidence": "0.9"},
            {"answer": "Paris", "confidence": 0.5, "extra": 1},
        ],
    ),
    (
        "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, "
        "entities: list[entity]",
        [
            {"analysis": ["a", "b"], "confidence": 0.5, "entities": []},
            {
                "analysis": [],
                "confidence": 0.1,
                "entities": [{"text": "Paris", "type": "LOC"}, {"text": "Ada", "type": "PER", "start": 3, "end": None}],
            },
        ],
        [
            {"analysis": "one step", "confidence": 0.5, "entities": []},
            {"analysis": [1], "confidence": 0.5, "entities": []},
            {"analysis": [], "confidence": 0.5, "entities": [{"text": "Paris"}]},
            {"analysis": [], "confidence": 0.5, "entities": [{"text": "Paris", "type": "LOC", "label": "x"}]},
            {"analysis": [], "confidence": 0.5, "entities": [{"text": "Paris", "type": "LOC", "start": "0"}]},
        ],
    ),
    (
        'text: str -> label: literal["positive", "negative", "neutral"], confidence: probability',
        [{"label": "neutral", "confidence": 0.3}],
        [{"label": "mixed", "confidence": 0.3}, {"label": "Positive", "confidence": 0.3}],
    ),
    (
        "a: str -> groups: list[dict[str, list[entity]]], by_key: dict[str, int]",
        [{"groups": [{"people": [{"text": "Ada", "type": "PER"}]}, {}], "by_key": {"x": 1}}],
        [
            {"groups": [{"people": [{"text": "Ada"}]}], "by_key": {}},
            {"groups": [{"people": {"text": "Ada", "type": "PER"}}], "by_key": {}},
            {"groups": [], "by_key": {"x": "1"}},
        ],
    ),
    (
        "a: str -> v: str | int, items: list[entity | int], note: optional[str], e: embedding, flag: bool",
        [
            {"v": "x", "items": [1, {"text": "a", "type": "b"}], "note": None, "e": [0.5, 1], "flag": False},
            {"v": 3, "items": [], "e": [], "flag": True},
        ],
        [
            {"v": 1.5, "items": [], "e": [], "flag": True},
            {"v": "x", "items": ["s"], "e": [], "flag": True},
            {"v": "x", "items": [], "note": 3, "e": [], "flag": True},
            {"v": "x", "items": [], "e": ["0.5"], "flag": True},
            {"v": "x", "items": [], "e": [], "flag": "true"},
        ],
    ),
    (
        "a: str -> payload: any, mapping: dict, tags: dict[literal[\"x\", \"y\"], float]",
        [{"payload": {"anything": [1, None]}, "mapping": {"k": [1]}, "tags": {"x": 1.5}}, {"mapping": {}, "tags": {}}],
        [{"payload": 1, "mapping": [], "tags": {}}, {"payload": 1, "mapping": {}, "tags": {"z": 1.0}}],
    ),
]
IDS = [spec.split("->")[1].strip()[:40] for spec, _, _ in CASES]
# The cases OpenAI strict mode can express (no open mappings, no free-form JSON).
STRICT_CASES = [c for c in CASES if "dict" not in c[0] and "any" not in c[0]]
STRICT_IDS = [spec.split("->")[1].strip()[:40] for spec, _, _ in STRICT_CASES]


@pytest.mark.parametrize(("spec", "good", "bad"), CASES, ids=IDS)
def test_generic_schemas_are_valid_2020_12_and_match_validation(
    spec: str, good: list[dict[str, Any]], bad: list[dict[str, Any]]
) -> None:
    s = sig(spec)
    inputs = checked(s.input_schema())
    outputs = checked(s.output_schema())
    assert s.output_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s.json_schema("generic") == s.output_schema()
    assert s.json_schema() == s.output_schema()
    for value in good:
        errs = [e.message for e in outputs.iter_errors(value)]
        assert not errs, (value, errs)
        # The library's own validation agrees, and what it returns still fits the schema.
        outputs.validate(s.validate_outputs(value))
    for value in bad:
        assert not outputs.is_valid(value), value
    assert inputs.is_valid({name: _sample(node) for name, node in s.input_fields.items()})


def _sample(normalized: str) -> Any:
    return {"str": "x", "list[str]": ["x"]}[normalized]


def test_input_schema_describes_the_inputs() -> None:
    s = sig("text: str, context: list[str], k: int, maybe: optional[float] -> a: str")
    schema = s.input_schema()
    v = checked(schema)
    assert set(schema["properties"]) == {"text", "context", "k", "maybe"}
    assert sorted(schema["required"]) == ["context", "k", "text"]
    assert schema["additionalProperties"] is False
    assert v.is_valid({"text": "a", "context": [], "k": 1})
    assert v.is_valid({"text": "a", "context": [], "k": 1, "maybe": None})
    assert not v.is_valid({"text": "a", "context": [], "k": "1"})
    assert not v.is_valid({"text": "a", "context": []})
    assert not v.is_valid({"text": "a", "context": [], "k": 1, "other": 1})


TABLE_SHAPES = [
    ("str", "x", 1),
    ("int", 3, 3.5),
    ("float", 3.5, "3.5"),
    ("bool", True, "true"),
    ("any", {"a": [None]}, None),
    ("dict", {"a": 1}, [1]),
    ('literal["a", "b"]', "a", "c"),
    ("embedding", [0.1, 2], ["0.1"]),
    ("confidence_score", 1, 1.5),
    ("probability", 0, -0.5),
    ("reasoning_chain", ["step"], "step"),
    ("entity", {"text": "a", "type": "b", "start": 0}, {"text": "a"}),
    ("list[int]", [1, 2], [1, "2"]),
    ("dict[str, int]", {"a": 1}, {"a": "1"}),
    ("str | int", 1, 1.5),
    ("optional[str]", None, 1),
]


@pytest.mark.parametrize(("type_", "good", "bad"), TABLE_SHAPES, ids=[t for t, _, _ in TABLE_SHAPES])
def test_each_type_has_its_documented_json_shape(type_: str, good: Any, bad: Any) -> None:
    s = sig(f"x: {type_} -> y: {type_}")
    for schema in (s.input_schema(), s.output_schema()):
        v = checked(schema)
        key = "x" if "x" in schema["properties"] else "y"
        assert v.is_valid({key: good})
        if bad is None:  # ``any`` takes every JSON value, null included
            assert v.is_valid({key: bad})
        else:
            assert not v.is_valid({key: bad})


def test_descriptions_and_titles_reach_the_schema() -> None:
    s = sig("a: str -> b: str", name="described", desc="Longer description.")
    checked(s.input_schema())
    checked(s.output_schema())
    assert s.output_schema()["description"] == "Longer description."
    assert s.output_schema()["title"] == "described_outputs"
    assert s.input_schema()["title"] == "described_inputs"


def test_schemas_are_copies() -> None:
    s = sig("a: str -> b: list[entity]")
    checked(s.output_schema())
    checked(s.json_schema("openai")["json_schema"]["schema"])
    s.output_schema()["properties"]["b"]["items"]["required"].append("mutated")
    s.json_schema("openai")["json_schema"]["schema"]["required"].append("mutated")
    assert "mutated" not in json.dumps(s.output_schema())
    assert "mutated" not in json.dumps(s.json_schema("openai"))


# -- OpenAI ----------------------------------------------------------------------------------------------------
OPENAI_SPECS = [spec for spec, _, _ in STRICT_CASES] + [
    "a: str -> deep: list[optional[list[entity | literal[\"x\"]]]], maybe: optional[entity], o: optional[list[str]]",
    "a: str -> e: entity",
    "a: str -> u: str | optional[int]",
]


@pytest.mark.parametrize("spec", OPENAI_SPECS)
def test_openai_response_format_obeys_strict_rules_at_every_level(spec: str) -> None:
    s = sig(spec, name="openai.case-1")
    fmt = s.json_schema("openai")
    assert set(fmt) == {"type", "json_schema"}
    assert fmt["type"] == "json_schema"
    assert set(fmt["json_schema"]) == {"name", "strict", "schema"}
    assert fmt["json_schema"]["strict"] is True
    name = fmt["json_schema"]["name"]
    assert name and len(name) <= 64 and all(c.isalnum() or c in "_-" for c in name)
    schema = fmt["json_schema"]["schema"]
    checked(schema)
    assert schema["type"] == "object"
    assert "$schema" not in schema
    assert_strict(schema)


@pytest.mark.parametrize(("spec", "good", "bad"), STRICT_CASES, ids=STRICT_IDS)
def test_openai_schema_accepts_what_validation_returns(
    spec: str, good: list[dict[str, Any]], bad: list[dict[str, Any]]
) -> None:
    s = sig(spec)
    strict = checked(s.json_schema("openai")["json_schema"]["schema"])
    for value in good:
        # The LM must send every key (nulls for optional ones); validate_outputs fills them in the same way.
        full = s.validate_outputs(value)
        assert strict.is_valid(full), list(strict.iter_errors(full))
    for value in bad:
        assert not strict.is_valid(value)


def test_openai_optional_fields_are_required_but_nullable() -> None:
    s = sig("a: str -> answer: str, note: optional[str], who: optional[entity], tags: optional[list[str]]")
    schema = s.json_schema("openai")["json_schema"]["schema"]
    v = checked(schema)
    assert sorted(schema["required"]) == ["answer", "note", "tags", "who"]
    for field in ("note", "who", "tags"):
        assert accepts_null(schema["properties"][field])
    assert not accepts_null(schema["properties"]["answer"])
    assert v.is_valid({"answer": "x", "note": None, "who": None, "tags": None})
    assert v.is_valid({"answer": "x", "note": "n", "who": {"text": "a", "type": "b", "start": None, "end": None},
                       "tags": ["t"]})
    assert not v.is_valid({"answer": "x", "who": None, "tags": None})  # strict: present even when null
    # The entity's own optional offsets become required-but-nullable too.
    entity = next(m for m in schema["properties"]["who"]["anyOf"] if m.get("type") == "object")
    assert sorted(entity["required"]) == ["end", "start", "text", "type"]
    assert accepts_null(entity["properties"]["start"])
    assert not accepts_null(entity["properties"]["text"])


def test_openai_keeps_bounds_and_enums() -> None:
    s = sig('a: str -> c: confidence_score, label: literal["x", "y"]')
    v = checked(s.json_schema("openai")["json_schema"]["schema"])
    assert v.is_valid({"c": 0.5, "label": "x"})
    assert not v.is_valid({"c": 1.5, "label": "x"})
    assert not v.is_valid({"c": 0.5, "label": "z"})


UNSUPPORTED = [
    ("a: str -> payload: any", "payload"),
    ("a: str -> mapping: dict", "mapping"),
    ("a: str -> ok: str, counts: dict[str, int]", "counts"),
    ("a: str -> rows: list[any]", "rows"),
    ("a: str -> groups: list[dict[str, list[entity]]]", "groups"),
    ("a: str -> maybe: optional[dict]", "maybe"),
    ("a: str -> u: str | any", "u"),
    ('a: str -> tags: dict[literal["x", "y"], float]', "tags"),
]


@pytest.mark.parametrize(("spec", "field"), UNSUPPORTED, ids=[s for s, _ in UNSUPPORTED])
def test_openai_rejects_free_form_fields_naming_them(spec: str, field: str) -> None:
    s = sig(spec)
    with pytest.raises(errors.SignatureError) as info:
        s.json_schema("openai")
    assert f"'{field}" in str(info.value)
    checked(s.output_schema())  # the generic schema still works


# -- Anthropic -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "good", "bad"), CASES, ids=IDS)
def test_anthropic_tool_validates_outputs(spec: str, good: list[dict[str, Any]], bad: list[dict[str, Any]]) -> None:
    s = sig(spec, name="anthropic_case", instructions="Answer well.")
    tool = s.json_schema("anthropic")
    assert set(tool) == {"name", "description", "input_schema"}
    assert tool["name"] == "anthropic_case"
    assert tool["description"] == "Answer well."
    schema = tool["input_schema"]
    assert schema["type"] == "object"
    assert "$schema" not in schema
    v = checked(schema)
    for value in good:
        assert v.is_valid(value), value
    for value in bad:
        assert not v.is_valid(value), value


def test_anthropic_description_prefers_desc_then_instructions() -> None:
    tools = [
        sig("a: str -> b: str", desc="D", instructions="I").json_schema("anthropic"),
        sig("a: str -> b: str", instructions="I").json_schema("anthropic"),
        sig("a: str -> b: str").json_schema("anthropic"),
    ]
    assert [t["description"] for t in tools[:2]] == ["D", "I"]
    assert tools[2]["description"]
    for tool in tools:
        checked(tool["input_schema"])


@pytest.mark.parametrize("target", ["gemini", "OpenAI", "", "json"])
def test_unknown_target_raises_value_error(target: str) -> None:
    with pytest.raises(ValueError, match="unknown schema target"):
        sig("a: str -> b: str").json_schema(target)


# -- property: every schema built from the grammar is valid, and strict where it can be ------------------------
_LEAVES = ["str", "int", "float", "bool", "embedding", "confidence_score", "reasoning_chain", "entity", 'literal["a", "b"]']


def _grow(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        children.map(lambda c: f"list[{c}]"),
        children.map(lambda c: f"optional[{c}]"),
        st.tuples(children, children).map(lambda p: f"{p[0]} | {p[1]}"),
    )


_strict_types = st.recursive(st.sampled_from(_LEAVES), _grow, max_leaves=5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_strict_types, min_size=1, max_size=4))
def test_property_schemas_are_valid_and_openai_strict(types: list[str]) -> None:
    s = sig("x: str -> " + ", ".join(f"f{i}: {t}" for i, t in enumerate(types)))
    checked(s.output_schema())
    schema = s.json_schema("openai")["json_schema"]["schema"]
    checked(schema)
    assert_strict(schema)
    for name, node in s.output_types.items():
        assert accepts_null(schema["properties"][name]) == node.nullable
