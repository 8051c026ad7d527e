"""The signature DSL: both spellings, nesting, round trips and definition-time errors."""

from __future__ import annotations

import builtins
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspex_tasks import Signature, errors, signature
from dspex_tasks.dsl.types import parse_type

pytestmark = pytest.mark.unit


def sig(spec: str, name: str = "dsl_test", **kwargs: Any) -> Signature:
    return signature(spec, name=name, register=False, **kwargs)


# (Python spelling, DSPex spelling, normalized form): every row of ARCHITECTURE 3.1's table.
TABLE = [
    ("str", ":string", "str"),
    ("int", ":integer", "int"),
    ("float", ":float", "float"),
    ("bool", ":boolean", "bool"),
    ("any", ":any", "any"),
    ("dict", ":map", "dict"),
    ("str", ":atom", "str"),
    ('literal["a", "b"]', '{:literal, ["a", "b"]}', 'literal["a", "b"]'),
    ("embedding", ":embedding", "embedding"),
    ("confidence_score", ":confidence_score", "confidence_score"),
    ("probability", ":probability", "confidence_score"),
    ("confidence_score", ":probability", "confidence_score"),
    ("reasoning_chain", ":reasoning_chain", "reasoning_chain"),
    ("entity", ":entity", "entity"),
    ("list[str]", "{:list, :string}", "list[str]"),
    ("dict[str, int]", "{:dict, :string, :integer}", "dict[str, int]"),
    ("str | int", "{:union, [:string, :integer]}", "str | int"),
    ("optional[str]", "{:optional, :string}", "optional[str]"),
]


@pytest.mark.parametrize(("python", "dspex", "normalized"), TABLE, ids=[f"{p}~{d}" for p, d, _ in TABLE])
def test_both_spellings_give_equal_signatures(python: str, dspex: str, normalized: str) -> None:
    a = sig(f"x: {python} -> y: {python}")
    b = sig(f"x: {dspex} -> y: {dspex}")
    assert a == b
    assert hash(a) == hash(b)
    assert a.input_fields == {"x": normalized}
    assert b.output_fields == {"y": normalized}
    assert parse_type(python) == parse_type(dspex)


def test_spellings_mix_in_one_spec_and_inside_composites() -> None:
    a = sig("text: :string, context: {:list, :string} -> answer: str, score: :confidence_score")
    b = sig("text: str, context: list[:string] -> answer: :string, score: confidence_score")
    assert a == b
    assert a.input_fields == {"text": "str", "context": "list[str]"}


def test_the_dspex_complex_analysis_spec_parses_like_the_python_one() -> None:
    dspex = sig(
        "text: :string, context: {:list, :string} -> analysis: :reasoning_chain, "
        "confidence: :confidence_score, entities: {:list, :entity}",
        name="complex_analysis",
    )
    python = sig(
        "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, entities: list[entity]",
        name="complex_analysis",
    )
    assert dspex == python
    assert list(dspex.output_fields) == ["analysis", "confidence", "entities"]


NESTED = [
    ("list[dict[str, list[entity]]]", "list[dict[str, list[entity]]]"),
    ("{:list, {:dict, :string, :any}}", "list[dict[str, any]]"),
    ("{:list, {:dict, :string, {:list, :entity}}}", "list[dict[str, list[entity]]]"),
    ("str | int", "str | int"),
    ("{:union, [:string, :integer]}", "str | int"),
    ("{:union, [:string, {:list, :integer}, :entity]}", "str | list[int] | entity"),
    ("optional[list[entity]]", "optional[list[entity]]"),
    ("{:optional, {:list, :entity}}", "optional[list[entity]]"),
    ("optional[optional[str]]", "optional[str]"),
    ('literal["a", "b"]', 'literal["a", "b"]'),
    ("literal['a', 'b']", 'literal["a", "b"]'),
    ('list[literal["x", "y"]]', 'list[literal["x", "y"]]'),
    ('dict[literal["x", "y"], float]', 'dict[literal["x", "y"], float]'),
    ("dict[str, optional[list[str | int]]]", "dict[str, optional[list[str | int]]]"),
    ("str | int | str", "str | int"),
    ("str | int | bool", "str | int | bool"),
    ("union[str, list[int]]", "str | list[int]"),
    ("list", "list[any]"),
    ("  list[ str ]  ", "list[str]"),
]


@pytest.mark.parametrize(("text", "normalized"), NESTED, ids=[t for t, _ in NESTED])
def test_nested_composites_normalize(text: str, normalized: str) -> None:
    s = sig(f"x: {text} -> y: {text}")
    assert s.input_fields["x"] == normalized
    assert s.output_fields["y"] == normalized
    assert parse_type(normalized) == parse_type(text)


def test_union_and_optional_nodes_have_the_right_shape() -> None:
    u = parse_type("{:union, [:string, :integer]}")
    assert u.kind == "union" and [n.kind for n in u.args] == ["str", "int"]
    o = parse_type("{:optional, {:list, :entity}}")
    assert o.kind == "optional" and o.nullable
    assert o.args[0].kind == "list" and o.args[0].args[0].kind == "entity"
    lit = parse_type('literal["a", "b"]')
    assert lit.kind == "literal" and lit.args == ("a", "b")
    assert not parse_type("str | int").nullable
    assert parse_type("str | optional[int]").nullable


ROUND_TRIP = [
    "question: str -> answer: str, confidence: confidence_score",
    "text: :string, context: {:list, :string} -> analysis: :reasoning_chain, entities: {:list, :entity}",
    'text: str -> label: literal["positive", "negative", "neutral"], confidence: probability',
    "a: {:union, [:string, :integer]}, b: {:optional, :map} -> c: list[dict[str, list[entity]]], d: embedding",
    "a: any, b: bool, c: float, d: int -> e: dict[str, optional[list[str | int]]]",
    "a: literal['it\\'s', \"x,y\", \"->\", \"[\"] -> b: str",
]


@pytest.mark.parametrize("spec", ROUND_TRIP)
@pytest.mark.parametrize("module", ["predict", "chain_of_thought"])
def test_normalized_spec_round_trips(spec: str, module: str) -> None:
    s = sig(spec, name="round_trip", module=module, instructions="Do the thing.")
    again = sig(s.spec, name="round_trip", module=module, instructions="Do the thing.")
    assert again == s
    assert again.spec == s.spec
    assert again.input_types == s.input_types
    assert again.output_types == s.output_types


def test_signatures_differ_by_name_type_instructions_and_module() -> None:
    base = sig("a: str -> b: str")
    assert base != sig("a: str -> b: str", name="other")
    assert base != sig("a: str -> b: int")
    assert base != sig("a: str -> b: str", instructions="x")
    assert base != sig("a: str -> b: str", module="chain_of_thought")
    assert base == sig("a:str->b:str")


# -- a property: any type built from the grammar parses the same in both spellings and round-trips -------------
_SCALAR_PAIRS = [(p, d) for p, d, _ in TABLE if "[" not in p and "|" not in p]
# Plain ASCII literal values; escapes and non-ASCII are covered by explicit tests below.
_literal_values = st.lists(
    st.text(alphabet=st.characters(codec="ascii", exclude_characters="\\"), max_size=6), min_size=1, max_size=3, unique=True
)


def _literal(values: list[str]) -> tuple[str, str]:
    quoted = ", ".join(json.dumps(v) for v in values)
    return f"literal[{quoted}]", f"{{:literal, [{quoted}]}}"


def _composites(children: st.SearchStrategy[tuple[str, str]]) -> st.SearchStrategy[tuple[str, str]]:
    return st.one_of(
        children.map(lambda c: (f"list[{c[0]}]", f"{{:list, {c[1]}}}")),
        children.map(lambda c: (f"dict[str, {c[0]}]", f"{{:dict, :string, {c[1]}}}")),
        children.map(lambda c: (f"optional[{c[0]}]", f"{{:optional, {c[1]}}}")),
        st.tuples(children, children).map(lambda p: (f"{p[0][0]} | {p[1][0]}", f"{{:union, [{p[0][1]}, {p[1][1]}]}}")),
    )


_types = st.recursive(st.one_of(st.sampled_from(_SCALAR_PAIRS), _literal_values.map(_literal)), _composites, max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_types)
def test_property_spellings_agree_and_round_trip(pair: tuple[str, str]) -> None:
    python, dspex = pair
    a, b = parse_type(python, field="f"), parse_type(dspex, field="f")
    assert a == b
    assert parse_type(a.normalized(), field="f") == a
    s = sig(f"x: {python} -> y: {dspex}")
    assert sig(s.spec) == s


# -- DSPy's untyped shorthand: a field without a type is a str ------------------------------------------------
SHORTHAND = [
    ("question -> answer", "question: str -> answer: str"),
    ("context, question -> answer", "context: str, question: str -> answer: str"),
    ("question -> answer: int, reasoning", "question: str -> answer: int, reasoning: str"),
    ("text: list[str], hint -> label: literal['a', 'b'], why", 'text: list[str], hint: str -> label: literal["a", "b"], why: str'),
    ("  question  ->  answer ", "question: str -> answer: str"),
]


@pytest.mark.parametrize(("short", "typed"), SHORTHAND, ids=[s for s, _ in SHORTHAND])
def test_untyped_shorthand_is_the_typed_spec_with_str(short: str, typed: str) -> None:
    a, b = sig(short, instructions="Do it."), sig(typed, instructions="Do it.")
    assert a == b and hash(a) == hash(b)
    assert a.spec == b.spec == typed
    assert a.input_types == b.input_types and a.output_types == b.output_types
    assert a.describe() == b.describe()
    for target in ("generic", "openai", "anthropic"):
        assert a.json_schema(target) == b.json_schema(target)
    assert a.input_schema() == b.input_schema()


def test_untyped_fields_are_strings_everywhere() -> None:
    s = sig("context, question -> answer")
    assert s.input_fields == {"context": "str", "question": "str"} and s.output_fields == {"answer": "str"}
    assert s.describe()["spec"] == "context: str, question: str -> answer: str"
    assert s.input_schema()["properties"] == {"context": {"type": "string"}, "question": {"type": "string"}}
    assert s.input_schema()["required"] == ["context", "question"]
    assert s.output_schema()["properties"] == {"answer": {"type": "string"}}
    assert s.validate_inputs({"context": "c", "question": "q"}) == {"context": "c", "question": "q"}
    with pytest.raises(errors.ValidationError):
        s.validate_inputs({"context": "c", "question": 3})


@pytest.mark.parametrize("module", ["predict", "chain_of_thought"])
def test_untyped_shorthand_builds_a_dspy_module_that_predicts(module: str) -> None:
    import dspy

    from dspex_tasks.dsl.signature import SignatureRegistry
    from dspex_tasks.programs.bridge import build_module
    from dspex_tasks.testing.mock_lm import MockLM

    s = sig("context, question -> answer", name="dsl_shorthand", module=module)
    typed = sig("context: str, question: str -> answer: str", name="dsl_shorthand", module=module)
    fields = s.to_dspy().model_fields
    assert {k: f.annotation for k, f in fields.items()} == {"context": str, "question": str, "answer": str}
    assert {k: f.annotation for k, f in fields.items()} == {
        k: f.annotation for k, f in typed.to_dspy().model_fields.items()}
    reg = SignatureRegistry()
    reg.add(s)
    lm = MockLM(registry=reg, scripted={s.name: {"answer": "Paris"}})
    with dspy.context(lm=lm):
        pred = build_module(s)(context="The capital of France is Paris.", question="Capital of France?")
    assert lm.calls == 1
    assert pred.answer == "Paris"
    assert s.validate_outputs({"answer": pred.answer}) == {"answer": "Paris"}


# -- definition-time errors ------------------------------------------------------------------------------------
ERRORS = [
    # unknown types, with a suggestion
    ("question: strng -> answer: str", ["unknown type 'strng'", "field 'question'", "did you mean 'str'"]),
    ("question: str -> answer: :strng", ["unknown type ':strng'", "field 'answer'", "did you mean ':string'"]),
    ("question: string -> answer: str", ["unknown type 'string'", "field 'question'", "did you mean 'str'"]),
    ("q: str -> items: list[entty]", ["unknown type 'entty'", "field 'items'", "did you mean 'entity'"]),
    ("q: str -> c: confidence", ["unknown type 'confidence'", "field 'c'", "did you mean 'confidence_score'"]),
    ("q: str -> c: Str", ["unknown type 'Str'", "field 'c'"]),
    # structure
    ("question: str, answer: str", ["missing '->'", "'question: str, answer: str'"]),
    ("question: str answer: str", ["missing '->'"]),
    (" -> answer: str", ["no input fields", "'-> answer: str'"]),
    ("question: str ->   ", ["no output fields", "'question: str ->'"]),
    ("a: str -> b: str -> c: str", ["more than one '->'"]),
    ("a: str, -> b: str", ["empty field", "input"]),
    ("a: str -> b: str,", ["empty field", "output"]),
    ("my question -> answer", ["field name 'my question'", "not an identifier", "'name: type' or 'name'"]),
    ("question -> the answer: int", ["field name 'the answer'", "not an identifier", "'the answer: int'"]),
    ("question: -> answer: str", ["field 'question'", "empty type"]),
    # names
    ("q: str, q: int -> a: str", ["duplicate field 'q'", "'q: str, q: int'"]),
    ("q: str -> a: str, a: int", ["duplicate field 'a'"]),
    ("q: str -> q: str", ["duplicate field 'q'", "both an input and an output"]),
    ("my-field: str -> a: str", ["field name 'my-field'", "not an identifier", "'my-field: str'"]),
    ("1st: str -> a: str", ["field name '1st'", "not an identifier"]),
    ("q: str -> two words: str", ["field name 'two words'", "not an identifier"]),
    ("class: str -> a: str", ["field name 'class'", "reserved", "'class: str'"]),
    ("q: str -> import: str", ["field name 'import'", "reserved"]),
    ("demos: str -> a: str", ["field name 'demos'", "reserved"]),
    ("q: str -> signature: str", ["field name 'signature'", "reserved"]),
    ("q: str, lm: str -> a: str", ["field name 'lm'", "reserved"]),
    ("q: str -> config: str", ["field name 'config'", "reserved"]),
    ("q: str -> instructions: str", ["field name 'instructions'", "reserved"]),
    ("_private: str -> a: str", ["field name '_private'", "reserved"]),
    # malformed composites
    ("q: list[str -> a: str", ["field 'q'", "unclosed '['", "list[str"]),
    ("q: str -> a: dict[str, list[int]", ["field 'a'", "unclosed '['", "dict[str, list[int]"]),
    ("q: {:list, :string -> a: str", ["field 'q'", "unclosed '{'", "{:list, :string"]),
    ("q: str] -> a: str", ["field 'q'", "unexpected ']'", "str]"]),
    ("q: str -> a: list[str]]", ["field 'a'", "unexpected ']'", "list[str]]"]),
    ("q: {:list, :string]} -> a: str", ["field 'q'", "unexpected ']'"]),
    ("q: dict[int, str] -> a: str", ["field 'q'", "dict keys", "'int'", "'dict[int, str]'"]),
    ("q: {:dict, :integer, :string} -> a: str", ["field 'q'", "dict keys", "'{:dict, :integer, :string}'"]),
    ("q: dict[float, str] -> a: str", ["field 'q'", "dict keys", "'float'"]),
    ("q: dict[str] -> a: str", ["field 'q'", "expected ','", "'dict[str]'"]),
    ("q: list[] -> a: str", ["field 'q'", "'list[]'"]),
    ("q: list[str,] -> a: str", ["field 'q'", "'list[str,]'"]),
    ("q: {:list} -> a: str", ["field 'q'", "'{:list}'"]),
    ("q: {:tuple, :string} -> a: str", ["field 'q'", "':tuple'", "'{:tuple, :string}'"]),
    ("q: str | -> a: str", ["field 'q'", "'str |'"]),
    ("q: list[str] str -> a: str", ["field 'q'", "unexpected 'str'", "'list[str] str'"]),
    # bad literals
    ("q: str -> a: literal[a, b]", ["field 'a'", "quoted strings", "'literal[a, b]'"]),
    ("q: str -> a: literal[]", ["field 'a'", "quoted strings", "'literal[]'"]),
    ("q: str -> a: literal[1, 2]", ["field 'a'", "'literal[1, 2]'"]),
    ('q: str -> a: literal["x", "x"]', ["field 'a'", "repeated", "'literal[\"x\", \"x\"]'"]),
    ('q: str -> a: literal["x" "y"]', ["field 'a'", "literal[\"x\" \"y\"]"]),
    ('q: str -> a: literal["x]', ["field 'a'", "unterminated string", 'literal["x]']),
    ('q: str -> a: {:literal, "x"}', ["field 'a'", "'{:literal, \"x\"}'"]),
]


@pytest.mark.parametrize(("spec", "expected"), ERRORS, ids=[s for s, _ in ERRORS])
def test_definition_errors_name_the_field_and_quote_the_text(spec: str, expected: list[str]) -> None:
    with pytest.raises(errors.SignatureError) as info:
        sig(spec)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert isinstance(info.value, errors.DspexError)
    assert info.value.code == "signature_error"


def test_reasoning_is_reserved_only_for_chain_of_thought() -> None:
    assert sig("q: str -> reasoning: str").output_fields == {"reasoning": "str"}
    for spec in ("q: str -> reasoning: str", "reasoning: str -> a: str"):
        with pytest.raises(errors.SignatureError, match="'reasoning' is reserved for chain_of_thought"):
            sig(spec, module="chain_of_thought")


@pytest.mark.parametrize("name", ["", "has space", "1qa", "-qa", "x" * 65, "qa/v1"])
def test_bad_signature_names_are_rejected(name: str) -> None:
    with pytest.raises(errors.SignatureError, match="signature name"):
        signature("a: str -> b: str", name=name, register=False)


def test_unknown_module_is_rejected() -> None:
    with pytest.raises(errors.SignatureError, match="unknown module 'react'"):
        sig("a: str -> b: str", module="react")


def test_a_failed_definition_registers_nothing() -> None:
    from dspex_tasks import registry

    with pytest.raises(errors.SignatureError):
        signature("a: strng -> b: str", name="dsl_never_registered")
    assert "dsl_never_registered" not in registry


# -- parsing never evaluates code ------------------------------------------------------------------------------
CODE = [
    ("q: __import__('os') -> a: str", ["field 'q'", "__import__('os')"]),
    ("q: str -> a: exec('import os')", ["field 'a'", "exec('import os')"]),
    ("q: str -> a: eval(\"1\")", ["field 'a'", "eval(\"1\")"]),
    ("q: str -> a: str, exec('x'): str", ["exec('x')", "not an identifier"]),
    ("q: list[__import__('os').system('true')] -> a: str", ["field 'q'"]),
    ("q: str -> a: os", ["unknown type 'os'", "field 'a'"]),
    ("q: str -> a: __builtins__", ["unknown type '__builtins__'", "field 'a'"]),
    ("q: str -> a: lambda", ["unknown type 'lambda'", "field 'a'"]),
    ("q: str -> a: str; import os", ["field 'a'"]),
    ("q: str -> a: list[str].__class__", ["field 'a'"]),
]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record what builtins.eval/exec run from here on (the DSL must resolve names from a table)."""
    calls: list[Any] = []
    for name in ("eval", "exec"):
        real = getattr(builtins, name)

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            calls.append(args[0])
            return _real(*args, **kwargs)

        monkeypatch.setattr(builtins, name, spy)
    return calls


@pytest.mark.parametrize(("spec", "expected"), CODE, ids=[s for s, _ in CODE])
def test_code_in_a_spec_is_an_error_not_evaluated(spec: str, expected: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    with pytest.raises(errors.SignatureError) as info:
        sig(spec)
    monkeypatch.undo()
    assert calls == []
    for part in expected:
        assert part in str(info.value)


def test_parsing_valid_types_never_calls_eval_or_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    for python, dspex, normalized in TABLE:
        parse_type(python), parse_type(dspex), parse_type(normalized)
    for text, _ in NESTED:
        parse_type(text)
    monkeypatch.undo()
    assert calls == []


def test_defining_a_signature_never_evaluates_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic may resolve its own forward references (JsonValue) with eval; none of our text may get there.
    calls = _spy(monkeypatch)
    defined = [sig(spec) for spec in ROUND_TRIP]
    monkeypatch.undo()
    for s in defined:
        words = {*s.input_fields, *s.output_fields}
        for code in calls:
            names = {code} if isinstance(code, str) else set(getattr(code, "co_names", ()))
            assert not words & names, (s.spec, code)
            assert not isinstance(code, str) or s.spec not in code


# -- literal values: quoting and escapes (see the bug notes in the report) -------------------------------------
LITERAL_VALUES = [
    ("it's",),
    ('say "hi"',),
    ("a\\b",),
    ("café",),
    ("naïve \"quoted\"",),  # non-ASCII together with an escape
    ("trailing\\",),  # a value ending in a backslash
    ("😀",),  # outside the BMP: JSON spells it with a surrogate pair
    ("x,y", "->", "[", "{"),
]


@pytest.mark.parametrize("values", LITERAL_VALUES, ids=[repr(v) for v in LITERAL_VALUES])
def test_literal_values_survive_quoting_and_the_spec_round_trip(values: tuple[str, ...]) -> None:
    # Spelled the way the normalized spec spells them: JSON string literals.
    spec = "q: str -> a: literal[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"
    s = sig(spec)
    assert s.output_types["a"].args == values
    again = sig(s.spec)
    assert again == s
    assert again.output_types["a"].args == values
    assert s.validate_outputs({"a": values[0]}) == {"a": values[0]}


@pytest.mark.parametrize("escape", ["\\u", "\\x", "\\N", "\\ud83d", "\\u12"])
def test_malformed_escapes_in_a_literal_are_signature_errors(escape: str) -> None:
    spec = f'q: str -> a: literal["{escape}"]'
    with pytest.raises(errors.SignatureError) as info:
        sig(spec)
    assert "field 'a'" in str(info.value)


# -- any spec either parses or raises SignatureError, never something else -------------------------------------
_TOKENS = [
    "str", "int", "[", "]", "{", "}", ",", ":", "->", "list", ":list", ":dict", ":string", "literal", ":literal",
    '"a"', "'b'", "|", " ", "x", "y", "dict", "optional", ":optional", ":union", "union", "'", '"', "entity",
    "any", "(", ")", "None", "\n", "x:", "y:", "é",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_TOKENS), max_size=14).map("".join))
def test_property_any_text_parses_or_raises_signature_error(spec: str) -> None:
    try:
        s = sig(spec)
    except errors.SignatureError:
        return
    assert sig(s.spec) == s
