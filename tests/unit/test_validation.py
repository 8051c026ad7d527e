"""validate_inputs / validate_outputs: errors with paths, strict inputs, lenient outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dspex_tasks import Signature, errors, signature

pytestmark = pytest.mark.unit


def sig(spec: str, name: str = "validation_test") -> Signature:
    return signature(spec, name=name, register=False)


ANALYSIS = sig(
    "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, entities: list[entity]",
    name="complex_analysis",
)
TYPED = sig(
    "n: int, x: float, flag: bool, p: probability, tags: dict[str, int], emb: embedding, maybe: optional[str] "
    "-> count: int, score: float, ok: bool, c: confidence_score, vec: embedding, note: optional[str]"
)

GOOD_OUTPUTS: dict[str, Any] = {
    "analysis": ["the text names a city", "so it is about travel"],
    "confidence": 0.8,
    "entities": [{"text": "Paris", "type": "LOC", "start": 0, "end": 5}, {"text": "Ada", "type": "PER"}],
}


def fields_of(exc: errors.ValidationError) -> list[str]:
    return [e["field"] for e in exc.errors]


def message_for(exc: errors.ValidationError, field: str) -> str:
    found = [e["message"] for e in exc.errors if e["field"] == field]
    assert found, f"no error for {field!r} in {exc.errors}"
    return found[0]


def resolve(data: Any, path: str) -> Any:
    """Walk ``a.0.b`` through dicts and lists; KeyError/IndexError when a step is not in the data."""
    node = data
    for step in path.split(".") if path else []:
        node = node[int(step)] if isinstance(node, list) else node[step]
    return node


def assert_paths_point_into(data: dict[str, Any], exc: errors.ValidationError) -> None:
    """Every reported path is a real place in the data (a missing field: its parent is)."""
    for e in exc.errors:
        path = e["field"]
        target = path.rpartition(".")[0] if e["message"] == "field required" else path
        try:
            resolve(data, target)
        except (KeyError, IndexError, TypeError, ValueError):
            pytest.fail(f"error path {path!r} does not point into the data {data!r} (errors: {exc.errors})")


# -- shape of good results -------------------------------------------------------------------------------------
def test_valid_inputs_and_outputs_come_back_as_plain_json() -> None:
    assert ANALYSIS.validate_inputs({"text": "Paris", "context": ["a", "b"]}) == {"text": "Paris", "context": ["a", "b"]}
    out = ANALYSIS.validate_outputs(GOOD_OUTPUTS)
    assert out["confidence"] == 0.8
    assert out["entities"][0] == {"text": "Paris", "type": "LOC", "start": 0, "end": 5}
    assert out["entities"][1] == {"text": "Ada", "type": "PER", "start": None, "end": None}
    assert list(out) == ["analysis", "confidence", "entities"]
    assert json.loads(json.dumps(out)) == out


def test_optional_fields_may_be_left_out_and_come_back_as_none() -> None:
    good = {"n": 1, "x": 1.5, "flag": True, "p": 0.5, "tags": {}, "emb": []}
    assert TYPED.validate_inputs(good)["maybe"] is None
    out = TYPED.validate_outputs({"count": 1, "score": 2.0, "ok": False, "c": 1, "vec": [0.5]})
    assert out["note"] is None


# -- missing, extra, mistyped ----------------------------------------------------------------------------------
def test_missing_fields_are_listed() -> None:
    with pytest.raises(errors.ValidationError) as info:
        ANALYSIS.validate_inputs({"text": "x"})
    assert info.value.errors == [{"field": "context", "message": "field required"}]
    assert "context" in str(info.value) and "complex_analysis" in str(info.value)


def test_extra_fields_are_rejected_on_both_sides() -> None:
    with pytest.raises(errors.ValidationError) as info:
        ANALYSIS.validate_inputs({"text": "x", "context": [], "question": "?"})
    assert info.value.errors == [{"field": "question", "message": "unexpected field"}]
    with pytest.raises(errors.ValidationError) as info:
        ANALYSIS.validate_outputs({**GOOD_OUTPUTS, "answer": "?"})
    assert fields_of(info.value) == ["answer"]


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(errors.ValidationError) as info:
        ANALYSIS.validate_inputs({"text": 3, "context": ["ok", 2, None], "extra": 1})
    assert sorted(fields_of(info.value)) == ["context.1", "context.2", "extra", "text"]
    for field in ("text", "context.1", "context.2", "extra"):
        assert field in str(info.value)


def test_nested_entity_errors_carry_the_full_path() -> None:
    bad = {
        **GOOD_OUTPUTS,
        "entities": [
            {"text": "Paris", "type": "LOC"},
            {"text": "Ada", "type": "PER"},
            {"text": "Bob"},
            {"text": "Eve", "type": 7, "start": "zero", "label": "x"},
        ],
    }
    with pytest.raises(errors.ValidationError) as info:
        ANALYSIS.validate_outputs(bad)
    assert message_for(info.value, "entities.2.type") == "field required"
    assert "string" in message_for(info.value, "entities.3.type")
    assert "integer" in message_for(info.value, "entities.3.start")
    assert message_for(info.value, "entities.3.label") == "unexpected field"
    assert len(info.value.errors) == 4
    assert_paths_point_into(bad, info.value)


def test_paths_go_through_dict_keys_and_list_indexes() -> None:
    s = sig("a: str -> groups: dict[str, list[entity]], matrix: list[list[int]]")
    bad = {"groups": {"people": [{"text": "Ada", "type": "PER"}, {"text": 1, "type": "PER"}]}, "matrix": [[1], [2, "x"]]}
    with pytest.raises(errors.ValidationError) as info:
        s.validate_outputs(bad)
    assert sorted(fields_of(info.value)) == ["groups.people.1.text", "matrix.1.1"]
    assert_paths_point_into(bad, info.value)


UNION_CASES = [
    ("a: str -> v: str | int", {"v": 1.5}),
    ("a: str -> v: list[str | int]", {"v": ["ok", 1.5]}),
    ("a: str -> v: entity | str", {"v": {"text": 1}}),
    ("a: str -> v: list[entity | int]", {"v": [{"text": "x"}]}),
    ("a: str -> v: any", {"v": {"z": {1, 2}}}),
    ("a: str -> v: dict[str, any]", {"v": {"k": [object()]}}),
]


@pytest.mark.parametrize(("spec", "bad"), UNION_CASES, ids=[s for s, _ in UNION_CASES])
def test_error_paths_inside_unions_point_into_the_data(spec: str, bad: dict[str, Any]) -> None:
    # pydantic tags union members in its error locations (``str``, ``int``, ``Entity``, ``dict``); those are not
    # places in the user's data and must not show up as path steps.
    with pytest.raises(errors.ValidationError) as info:
        sig(spec).validate_outputs(bad)
    assert info.value.errors
    assert_paths_point_into(bad, info.value)


@pytest.mark.parametrize("data", [None, [], "text", 3])
def test_a_non_object_is_rejected_at_the_root(data: Any) -> None:
    for validate in (ANALYSIS.validate_inputs, ANALYSIS.validate_outputs):
        with pytest.raises(errors.ValidationError) as info:
            validate(data)
        assert info.value.errors == [{"field": "", "message": f"expected an object, got {type(data).__name__}"}]


# -- confidence_score ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-0.01, 1.01, 2, -1, "1.5"])
def test_confidence_outside_unit_interval_fails(value: Any) -> None:
    with pytest.raises(errors.ValidationError) as info:
        ANALYSIS.validate_outputs({**GOOD_OUTPUTS, "confidence": value})
    assert fields_of(info.value) == ["confidence"]
    with pytest.raises(errors.ValidationError) as info:
        TYPED.validate_inputs({"n": 1, "x": 1.0, "flag": True, "p": value, "tags": {}, "emb": []})
    assert fields_of(info.value) == ["p"]


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 0.5, "0", "1", "0.25"])
def test_confidence_inside_unit_interval_passes(value: Any) -> None:
    out = ANALYSIS.validate_outputs({**GOOD_OUTPUTS, "confidence": value})
    assert out["confidence"] == float(value)
    assert isinstance(out["confidence"], float)


# -- outputs: the documented coercions -------------------------------------------------------------------------
COERCIONS = [
    ("c", "0.9", 0.9),
    ("score", "0.9", 0.9),
    ("score", "-2.5", -2.5),
    ("score", 3, 3.0),
    ("c", 1, 1.0),
    ("count", "3", 3),
    ("count", 3.0, 3),
    ("ok", "true", True),
    ("ok", "false", False),
    ("ok", "True", True),
    ("vec", ["0.5", 1], [0.5, 1.0]),
]
GOOD_TYPED_OUT: dict[str, Any] = {"count": 1, "score": 0.5, "ok": True, "c": 0.5, "vec": [0.1]}


@pytest.mark.parametrize(("field", "given", "expected"), COERCIONS, ids=[f"{f}={g!r}" for f, g, _ in COERCIONS])
def test_outputs_coerce_lm_text(field: str, given: Any, expected: Any) -> None:
    out = TYPED.validate_outputs({**GOOD_TYPED_OUT, field: given})
    assert out[field] == expected
    assert type(out[field]) is type(expected)
    if isinstance(expected, list):
        assert [type(v) for v in out[field]] == [type(v) for v in expected]


NOT_COERCED = [("count", "3.5"), ("count", 3.5), ("count", "three"), ("score", "high"), ("ok", "maybe"), ("c", "x")]


@pytest.mark.parametrize(("field", "given"), NOT_COERCED, ids=[f"{f}={g!r}" for f, g in NOT_COERCED])
def test_outputs_still_reject_what_does_not_parse(field: str, given: Any) -> None:
    with pytest.raises(errors.ValidationError) as info:
        TYPED.validate_outputs({**GOOD_TYPED_OUT, field: given})
    assert fields_of(info.value) == [field]


def test_literal_outputs_must_be_one_of_the_values() -> None:
    s = sig('text: str -> label: literal["positive", "negative", "neutral"]')
    assert s.validate_outputs({"label": "neutral"}) == {"label": "neutral"}
    with pytest.raises(errors.ValidationError) as info:
        s.validate_outputs({"label": "mixed"})
    assert fields_of(info.value) == ["label"]
    for value in ("positive", "negative", "neutral"):
        assert value in message_for(info.value, "label")


# -- inputs: strict --------------------------------------------------------------------------------------------
GOOD_TYPED_IN: dict[str, Any] = {"n": 1, "x": 1.5, "flag": True, "p": 0.5, "tags": {"a": 1}, "emb": [0.1, 2]}
STRICT = [
    ("n", "3"),
    ("n", 3.0),
    ("n", True),
    ("x", "1.5"),
    ("flag", "true"),
    ("flag", 1),
    ("p", "0.5"),
    ("tags", {"a": "1"}),
    ("emb", ["0.1"]),
    ("maybe", 3),
]


@pytest.mark.parametrize(("field", "given"), STRICT, ids=[f"{f}={g!r}" for f, g in STRICT])
def test_inputs_are_strict(field: str, given: Any) -> None:
    bad = {**GOOD_TYPED_IN, field: given}
    with pytest.raises(errors.ValidationError) as info:
        TYPED.validate_inputs(bad)
    assert len(info.value.errors) == 1
    assert info.value.errors[0]["field"].split(".")[0] == field
    assert_paths_point_into(bad, info.value)


def test_inputs_accept_an_int_for_a_float() -> None:
    out = TYPED.validate_inputs({**GOOD_TYPED_IN, "x": 2, "p": 1, "emb": [1, 2]})
    assert out["x"] == 2.0 and isinstance(out["x"], float)
    assert out["p"] == 1.0 and isinstance(out["p"], float)
    assert out["emb"] == [1.0, 2.0] and all(isinstance(v, float) for v in out["emb"])


def test_input_entities_are_objects_checked_field_by_field() -> None:
    s = sig("entities: list[entity] -> summary: str")
    good = {"entities": [{"text": "Ada", "type": "PER", "start": 0, "end": 3}]}
    assert s.validate_inputs(good) == good
    bad = {"entities": [{"text": "Ada", "type": "PER", "start": "0"}]}
    with pytest.raises(errors.ValidationError) as info:
        s.validate_inputs(bad)
    assert fields_of(info.value) == ["entities.0.start"]


def test_any_accepts_json_and_nothing_else() -> None:
    s = sig("payload: any -> ok: bool")
    value = {"a": [1, 2.5, None, True, "x", {"b": []}]}
    assert s.validate_inputs({"payload": value}) == {"payload": value}
    assert s.validate_inputs({"payload": None}) == {"payload": None}
    with pytest.raises(errors.ValidationError) as info:
        s.validate_inputs({"payload": object()})
    assert fields_of(info.value) == ["payload"]


# -- the error crosses the wire --------------------------------------------------------------------------------
def _caught() -> errors.ValidationError:
    try:
        ANALYSIS.validate_outputs({"confidence": 2, "entities": [{"text": "x"}], "extra": 1})
    except errors.ValidationError as exc:
        return exc
    raise AssertionError("no ValidationError raised")


def test_validation_error_survives_a_json_round_trip_of_its_args() -> None:
    exc = _caught()
    assert len(exc.errors) == 4
    again = errors.ValidationError(*json.loads(json.dumps(list(exc.args))))
    assert again.errors == exc.errors
    assert str(again) == str(exc)
    assert again.code == "validation_error"
    remote = errors.from_remote("ValidationError", json.loads(json.dumps(list(exc.args))))
    assert isinstance(remote, errors.ValidationError)
    assert remote.errors == exc.errors


def test_validation_errors_are_dicts_of_strings() -> None:
    for e in _caught().errors:
        assert set(e) == {"field", "message"}
        assert isinstance(e["field"], str) and isinstance(e["message"], str) and e["message"]


def test_the_summary_lists_at_most_five_fields() -> None:
    s = sig("a: str -> " + ", ".join(f"f{i}: int" for i in range(8)))
    with pytest.raises(errors.ValidationError) as info:
        s.validate_outputs({})
    assert len(info.value.errors) == 8
    assert "(+3 more)" in str(info.value)
    assert "f0: field required" in str(info.value)
