"""The HTTP mock LM server answers the reference programs through a real ``dspy.LM`` (LiteLLM), deterministically."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

import dspy
import pydantic
import pytest

import signatures.programs  # noqa: F401  (registers the programs)
from dspex_tasks import registry
from dspex_tasks.testing import mockgen
from dspex_tasks.testing.mock_lm import MockLM
from dspex_tasks.testing.mock_server import MockLMServer
from signatures.programs.extract import Event, Person
from tests.unit.test_reference_programs import ADAPTER_IDS, ADAPTERS, INPUTS, check_outputs, run

pytestmark = pytest.mark.unit


def _plain(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return {"__model__": type(value).__name__, **value.model_dump()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _everything(pred: dspy.Prediction) -> dict[str, Any]:
    """Every field of a prediction (the agent's trajectory and the multihop's notes too)."""
    return {k: _plain(v) for k, v in pred.items()}


@pytest.fixture(scope="module")
def server() -> Iterator[MockLMServer]:
    with MockLMServer(port=0, seed=0) as srv:
        yield srv


def _lm(server: MockLMServer, model: str = "openai/mock") -> dspy.LM:
    return dspy.LM(model, api_base=server.url, api_key="x", cache=False)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=ADAPTER_IDS)
@pytest.mark.parametrize("name", list(INPUTS))
def test_server_answers_the_program_deterministically(server: MockLMServer, name: str, adapter: dspy.Adapter) -> None:
    before = server.stats()["requests"]
    first = run(name, _lm(server), adapter)
    calls = server.stats()["requests"] - before
    assert calls >= 1 and server.stats()["errors"] == 0
    check_outputs(name, first)
    second = run(name, _lm(server), adapter)
    assert _everything(second) == _everything(first)
    assert server.stats()["requests"] - before == 2 * calls
    # Over HTTP or in process, the same prompts get the same answers.
    assert _everything(run(name, MockLM(seed=0), adapter)) == _everything(first)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=ADAPTER_IDS)
def test_agent_over_http_runs_real_tools(server: MockLMServer, adapter: dspy.Adapter) -> None:
    trajectory = run("agent", _lm(server), adapter).trajectory
    names = [v for k, v in trajectory.items() if k.startswith("tool_name_")]
    assert names[-1] == "finish" and 1 <= len(names) - 1 <= 2
    for i in range(len(names) - 1):
        observation = trajectory[f"observation_{i}"]
        assert not (isinstance(observation, str) and observation.startswith("Execution error")), observation


def test_extract_with_structured_outputs(server: MockLMServer) -> None:
    """A model LiteLLM knows takes structured outputs: JSONAdapter sends the pydantic schema as response_format
    (nested models, $defs/$ref) and the server answers from that schema."""
    lm = _lm(server, "openai/gpt-4o-mini")
    assert lm.supports_response_schema
    pred = run("extract", lm, dspy.JSONAdapter())
    sent = lm.history[-1]["kwargs"].get("response_format")
    assert sent is not None and sent != {"type": "json_object"}
    assert pred.people and all(isinstance(p, Person) for p in pred.people)
    assert pred.events and all(isinstance(e, Event) and all(isinstance(p, Person) for p in e.people)
                               for e in pred.events)
    check_outputs("extract", pred)
    assert _everything(run("extract", lm, dspy.JSONAdapter())) == _everything(pred)


def _react_messages(adapter: dspy.Adapter, trajectory: str = "") -> tuple[Any, list[dict[str, Any]]]:
    react = registry.get("agent").factory()
    inputs = {**INPUTS["agent"], "trajectory": trajectory}
    return react, adapter.format(react.react.signature, demos=[], inputs=inputs)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=ADAPTER_IDS)
def test_react_tools_are_read_from_the_prompt(adapter: dspy.Adapter) -> None:
    react, messages = _react_messages(adapter)
    tools = mockgen.react_tools(mockgen.parse_prompt(messages))
    assert tools == {name: tool.args for name, tool in react.tools.items()}
    assert tools["day_of_week"] == {"date": {"format": "date", "type": "string"}}
    plain = dspy.ChatAdapter().format(dspy.Signature("question -> answer"), demos=[], inputs=INPUTS["agent"])
    assert mockgen.react_tools(mockgen.parse_prompt(plain)) is None


def test_react_step_for_a_structured_output_request() -> None:
    """``answer_for_schema`` (response_format json_schema) plays the same ReAct turn as ``answer``."""
    react, messages = _react_messages(dspy.JSONAdapter())
    names = list(react.tools)
    schema = {"type": "object", "properties": {
        "next_thought": {"type": "string"}, "next_tool_name": {"type": "string", "enum": names},
        "next_tool_args": {"type": "object", "additionalProperties": True}}}
    step = json.loads(mockgen.answer_for_schema(messages, schema, seed=4))
    assert step["next_tool_name"] in names and step["next_tool_name"] != "finish"
    observation = react.tools[step["next_tool_name"]](**step["next_tool_args"])  # arguments fit the tool
    assert observation is not None
    chat_turn = json.loads(mockgen.answer(messages, seed=4))
    assert {k: chat_turn[k] for k in ("next_tool_name", "next_tool_args")} == {
        k: step[k] for k in ("next_tool_name", "next_tool_args")}


def test_react_finishes_after_at_most_two_tool_calls() -> None:
    adapter = dspy.ChatAdapter()
    _, messages = _react_messages(adapter)
    for seed in range(20):
        names = []
        trajectory: dict[str, Any] = {}
        for i in range(4):
            text = adapter.format_user_message_content(dspy.Signature(f"{', '.join(trajectory) or 'x'} -> y"),
                                                       trajectory) if trajectory else ""
            _, msgs = _react_messages(adapter, text)
            step = mockgen.react_step(mockgen.parse_prompt(msgs), seed)
            assert step is not None
            names.append(step["next_tool_name"])
            if names[-1] == "finish":
                break
            trajectory.update({f"thought_{i}": "t", f"tool_name_{i}": names[-1],
                               f"tool_args_{i}": step["next_tool_args"], f"observation_{i}": "ok"})
        assert names[-1] == "finish" and 2 <= len(names) <= 3 and "finish" not in names[:-1], names


@pytest.mark.parametrize(("fmt", "parse"), [
    ("date", datetime.date.fromisoformat),
    ("date-time", lambda v: datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))),
    ("time", datetime.time.fromisoformat),
])
def test_string_formats_get_parseable_values(fmt: str, parse: Any) -> None:
    values = {mockgen.value_for({"type": "string", "format": fmt}, f"k{i}") for i in range(50)}
    assert len(values) > 10
    for v in values:
        parse(v)
    model = pydantic.TypeAdapter(list[datetime.date])
    model.validate_python(mockgen.value_for(model.json_schema(), "dates"))
