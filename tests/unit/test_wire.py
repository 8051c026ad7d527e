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
