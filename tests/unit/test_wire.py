"""The wire format is defined once (dspex_tasks.wire) and every sender and reader uses it."""

from __future__ import annotations

import math

import pytest

from dspex_tasks import errors, signature, wire
from dspex_tasks.app import create_app
from dspex_tasks.observability.prometheus import signature_of
from dspex_tasks.settings import Settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["qa", "complex_analysis", "a.b-c", "mapper", "optimizer", "x.optimize"])
def test_task_names_round_trip(name: str) -> None:
    assert wire.task_name(name) == f"dspex.{name}"
    assert wire.program_of(wire.task_name(name)) == name
    assert signature_of(wire.task_name(name)) == name


@pytest.mark.parametrize("task", [wire.MAP_TASK, wire.STAGE_TASK, wire.EVAL_CHUNK_TASK, wire.SCHEDULED_TASK,
                                  "celery.chord_unlock", "other.task", "dspex."])
def test_the_wire_own_tasks_are_not_programs(task: str) -> None:
    assert wire.program_of(task) is None


@pytest.mark.parametrize("name", ["map", "optimize", "optimize.stage", "optimize.anything"])
def test_names_the_wire_uses_are_reserved(name: str) -> None:
    with pytest.raises(errors.SignatureError, match=f"'{name}' is reserved"):
        signature("question: str -> answer: str", name=name, register=False)


def test_routes_send_stages_to_the_optimize_queue_and_programs_to_predictions() -> None:
    app = create_app(Settings(predict_queue="p.q", optimize_queue="o.q"))
    route = app.amqp.router.route
    assert route({}, wire.STAGE_TASK)["queue"].name == "o.q"
    assert route({}, wire.SCHEDULED_TASK)["queue"].name == "o.q"
    assert route({}, wire.task_name("qa"))["queue"].name == "p.q"
    assert route({}, wire.MAP_TASK)["queue"].name == "p.q"


def test_kwargs_shapes() -> None:
    assert wire.predict_kwargs({"q": "x"}, "s", None) == {"inputs": {"q": "x"}, "session": "s", "program": None}
    assert wire.map_kwargs("qa", [{"q": "x"}], None, "p") == {"signature": "qa", "items": [{"q": "x"}],
                                                               "session": None, "program": "p"}
    assert wire.sent_headers(12.5) == {wire.SENT_AT_HEADER: 12.5}


def test_unexpected_task_arguments_name_each_one() -> None:
    with pytest.raises(errors.ValidationError) as info:
        wire.check_task_args("dspex.qa", ("pos",), {"extra": 1}, "inputs, session, program")
    fields = [e["field"] for e in info.value.errors]
    assert fields == ["extra", "args"] and "expected inputs, session, program" in info.value.errors[0]["message"]


def test_the_task_of_a_signature_is_read_from_the_app_not_stored_on_it() -> None:
    from dspex_tasks.dsl.signature import SignatureRegistry
    from dspex_tasks.worker.app import create_worker_app

    reg = SignatureRegistry()
    sig = signature("question: str -> answer: str", name="wire_task_probe", register=False)
    reg.add(sig)
    app = create_worker_app(Settings(), signatures=reg, import_modules=False)
    app.set_current()
    assert sig.task is app.tasks[wire.task_name("wire_task_probe")]


def test_integral_floats_reach_the_worker_as_ints_so_both_validators_agree() -> None:
    """JSON Schema (the client) counts 3.0 as an integer; the worker's strict pydantic does not."""
    from jsonschema import Draft202012Validator

    sig = signature("n: int, x: float, items: list[int] -> y: str", name="numbers_agree", register=False)
    raw = {"n": 3.0, "x": 2.0, "items": [1.0, 2.0]}
    assert not list(Draft202012Validator(sig.input_schema()).iter_errors(raw))  # the client accepts it ...
    with pytest.raises(errors.ValidationError):
        sig.validate_inputs(raw)  # ... the worker would not
    sent = wire.json_numbers(raw)
    assert sent == {"n": 3, "x": 2, "items": [1, 2]} and isinstance(sent["n"], int)
    assert sig.validate_inputs(sent) == {"n": 3, "x": 2.0, "items": [1, 2]}
    assert wire.json_numbers({"x": 2.5, "s": "3.0", "b": True}) == {"x": 2.5, "s": "3.0", "b": True}
    assert math.isnan(wire.json_numbers(float("nan")))


# -- per-request options (ARCHITECTURE 3.6) ------------------------------------------------------------------
def test_options_travel_only_when_set_so_existing_messages_are_unchanged() -> None:
    assert wire.request_options() == {}
    assert wire.request_options(trace=False, lm_config={}) == {}
    assert "options" not in wire.predict_kwargs({"q": "x"}, None, None, {})
    assert "options" not in wire.map_kwargs("qa", [], None, None, None)
    options = wire.request_options(trace=True, lm_config={"temperature": 0.3, "max_tokens": 50.0})
    assert options == {"trace": True, "lm_config": {"temperature": 0.3, "max_tokens": 50}}
    assert wire.predict_kwargs({"q": "x"}, "s", None, options)["options"] == options
    assert wire.map_kwargs("qa", [], None, None, options)["options"] == options
    # a worker reads a message without options (or with null ones) as no options
    assert wire.check_options(None) == {} and wire.check_options({"trace": None, "lm_config": None}) == {}


@pytest.mark.parametrize("lm_config", [
    {"temperature": 0}, {"temperature": 2.0}, {"top_p": 0.9}, {"max_tokens": 1}, {"n": 3},
    {"rollout_id": 7}, {"rollout_id": "run-a"},
    {"temperature": 0.3, "top_p": 1, "max_tokens": 4096, "n": 1, "rollout_id": 0},
])
def test_allowed_lm_config_passes_unchanged(lm_config: dict[str, object]) -> None:
    assert wire.check_options({"lm_config": lm_config}) == {"lm_config": lm_config}


@pytest.mark.parametrize(("lm_config", "field", "message"), [
    ({"api_base": "http://evil"}, "options.lm_config.api_base",
     "not allowed; allowed: max_tokens, n, rollout_id, temperature, top_p"),
    ({"api_key": "sk-x"}, "options.lm_config.api_key", "not allowed"),
    ({"model": "openai/gpt-4o"}, "options.lm_config.model", "not allowed"),
    ({"temperature": "0.3"}, "options.lm_config.temperature", "expected a number"),
    ({"temperature": True}, "options.lm_config.temperature", "expected a number"),
    ({"temperature": -0.1}, "options.lm_config.temperature", "between 0 and 2"),
    ({"temperature": 2.5}, "options.lm_config.temperature", "between 0 and 2"),
    ({"temperature": math.nan}, "options.lm_config.temperature", "between 0 and 2"),
    ({"top_p": 1.5}, "options.lm_config.top_p", "between 0 and 1"),
    ({"max_tokens": 0}, "options.lm_config.max_tokens", ">= 1"),
    ({"max_tokens": 10.5}, "options.lm_config.max_tokens", "expected an integer"),
    ({"n": 0}, "options.lm_config.n", "between 1 and 128"),
    ({"n": False}, "options.lm_config.n", "expected an integer"),
    ({"rollout_id": 1.5}, "options.lm_config.rollout_id", "an integer or a string"),
    ({"rollout_id": ""}, "options.lm_config.rollout_id", "an integer or a string"),
])
def test_bad_lm_config_names_the_field(lm_config: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        wire.check_options({"lm_config": lm_config})
    assert [e["field"] for e in info.value.errors] == [field]
    assert message in info.value.errors[0]["message"]
    assert f"{field}: {info.value.errors[0]['message']}" in info.value.message


def test_bad_options_name_each_field_with_the_caller_prefix() -> None:
    with pytest.raises(errors.ValidationError) as info:
        wire.check_options({"trace": "yes", "lm_config": {"api_base": "x", "n": 2}, "stream": 1, "timeout_s": 0,
                            "priority": 3})
    assert {e["field"]: e["message"] for e in info.value.errors} == {
        "options.trace": "expected true or false",
        "options.lm_config.api_base": "not allowed; allowed: max_tokens, n, rollout_id, temperature, top_p",
        "options.stream": "expected true or false",
        "options.timeout_s": "expected a number of seconds > 0 and <= 86400",
        "options.priority": "unknown option; known: lm_config, trace, stream, timeout_s"}
    assert wire.check_options({"stream": True, "timeout_s": 2, "trace": False}) == {"stream": True, "timeout_s": 2.0}
    with pytest.raises(errors.ValidationError) as info:  # the gateway's body fields are top level
        wire.check_options({"lm_config": ["temperature"]}, prefix="")
    assert info.value.errors == [{"field": "lm_config", "message": "expected an object"}]
    with pytest.raises(errors.ValidationError, match="options: expected an object"):
        wire.check_options(["trace"])


def test_lm_config_schema_agrees_with_the_check() -> None:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(wire.lm_config_schema())
    samples: list[dict[str, object]] = [
        {"temperature": 0.3}, {"temperature": 3}, {"top_p": -1}, {"max_tokens": 0}, {"max_tokens": 10},
        {"n": 129}, {"n": 128}, {"rollout_id": "r"}, {"rollout_id": 2}, {"rollout_id": ""}, {"api_base": "x"}]
    for sample in samples:
        try:
            wire.check_options({"lm_config": sample})
            accepted = True
        except errors.ValidationError:
            accepted = False
        assert accepted == validator.is_valid(sample), sample
