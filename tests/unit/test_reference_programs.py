"""The reference programs (``signatures.programs``) run in process under MockLM, through DSPy's real adapters."""

from __future__ import annotations

from typing import Any

import dspy
import jsonschema
import pytest

import signatures.programs as programs
from dspex_tasks import registry
from dspex_tasks.testing import mockgen
from dspex_tasks.testing.mock_lm import MockLM
from signatures.programs import agent
from signatures.programs.corpus import corpus, lookup, search
from signatures.programs.extract import Event, Person
from signatures.programs.refine import one_word_answer
from tests._values import plain as _plain

pytestmark = pytest.mark.unit

INPUTS: dict[str, dict[str, str]] = {
    "rag": {"question": "Who designed the Greymaw Light?"},
    "multihop": {"claim": "The lighthouse guarding the Skerrin Sound was designed by a cartographer born in 1770."},
    "agent": {"question": "How many years after Port Ellery was founded was the Greymaw Light built?"},
    "best_answer": {"question": "In what year was Port Ellery founded?"},
    "extract": {"text": "Tobias Venn designed the Greymaw Light, built in 1811 on Skerrin. Edda Frane kept it for 41 years."},
}
INTERFACES = {
    "rag": ({"question": "str"}, {"response": "str"}),
    "multihop": ({"claim": "str"}, {"titles": "list[str]"}),
    "agent": ({"question": "str"}, {"answer": "str"}),
    "best_answer": ({"question": "str"}, {"answer": "str"}),
    "extract": ({"text": "str"}, {"people": "list[Person]", "events": "list[Event]"}),
}
ADAPTERS = [dspy.ChatAdapter(use_json_adapter_fallback=False), dspy.JSONAdapter()]
ADAPTER_IDS = ["chat", "json"]




def run(name: str, lm: Any, adapter: dspy.Adapter, **inputs: Any) -> dspy.Prediction:
    """Build the registered program the way a worker does (its factory, no arguments) and call it."""
    module = registry.get(name).factory()
    with dspy.context(lm=lm, adapter=adapter):
        pred = module(**(inputs or INPUTS[name]))
    assert isinstance(pred, dspy.Prediction), f"{name} returned {type(pred).__name__}"
    return pred


def check_outputs(name: str, pred: dspy.Prediction) -> dict[str, Any]:
    """The interface's outputs validate against the program's signature and its JSON schema."""
    sig = registry.get(name)
    outputs = {k: _plain(pred[k]) for k in sig.output_fields}
    validated: dict[str, Any] = sig.validate_outputs(outputs)
    jsonschema.Draft202012Validator(sig.output_schema()).validate(validated)
    return validated


def test_programs_are_registered_with_their_interfaces() -> None:
    assert set(programs.NAMES) == set(INTERFACES)
    for name, (inputs, outputs) in INTERFACES.items():
        sig = registry.get(name)
        assert (sig.input_fields, sig.output_fields) == (inputs, outputs), name
        assert sig.factory is not None


@pytest.mark.parametrize("adapter", ADAPTERS, ids=ADAPTER_IDS)
@pytest.mark.parametrize("name", list(INPUTS))
def test_program_runs_and_its_outputs_validate(name: str, adapter: dspy.Adapter) -> None:
    pred = run(name, MockLM(seed=3), adapter)
    out = check_outputs(name, pred)
    if name == "extract":
        assert pred.people and all(isinstance(p, Person) for p in pred.people)
        assert pred.events and all(isinstance(e, Event) for e in pred.events)
        assert all(isinstance(p, Person) for e in pred.events for p in e.people)
        assert all(e.kind in ("founding", "construction", "disaster", "treaty", "other") for e in pred.events)
    elif name == "multihop":
        assert pred.titles and all(isinstance(t, str) for t in pred.titles)
        assert len(set(pred.titles)) == len(pred.titles)
    else:
        assert all(isinstance(v, str) and v for v in out.values())
    again = run(name, MockLM(seed=3), adapter)
    assert check_outputs(name, again) == out  # deterministic


def test_bm25_ranks_relevant_passages_first() -> None:
    assert 50 <= len(corpus()) <= 200
    cases = {
        "Who designed the Greymaw Light?": {"Greymaw Light", "Tobias Venn"},
        "Where does the Caddow fox live?": {"Caddow fox"},
        "When did the tin mine at Drennick close?": {"Drennick tin mine"},
        "What currency do the islands use?": {"Veshan mark"},
        "How tall is Mount Corrin?": {"Mount Corrin"},
        "Which poet wrote Salt and Basalt?": {"Salt and Basalt", "Maren Hollis"},
        "When was the Corrin Bridge opened?": {"Corrin Bridge"},
    }
    for question, relevant in cases.items():
        top = [p.split(" | ", 1)[0] for p in search(question, k=3)]
        assert top[0] in relevant, (question, top)
    assert search("zzzz qqqq", k=5) == []  # no shared term, no passage
    assert len(search("Veshan Isles", k=4)) == 4
    assert lookup("greymaw light") == search("Greymaw Light lighthouse Skerrin 1811", k=1)[0]


def test_rag_gives_the_lm_the_retrieved_passages() -> None:
    lm = MockLM()
    run("rag", lm, ADAPTERS[0])
    assert lm.calls == 1
    prompt = mockgen.parse_prompt(lm.history[-1]["messages"])
    assert set(prompt.input_fields) == {"context", "question"}
    assert prompt.inputs["question"] == INPUTS["rag"]["question"]
    context = str(prompt.inputs["context"])  # an untyped field: DSPy shows the list as "[1] «...» [2] «...»"
    passages = search(INPUTS["rag"]["question"], k=5)
    assert len(passages) == 5 and all(f"«{p}»" in context for p in passages)
    assert context.index("«Tobias Venn | ") < context.index("«Skerrin | ")  # best first


@pytest.mark.parametrize("adapter", ADAPTERS, ids=ADAPTER_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_agent_calls_real_tools_then_finishes(adapter: dspy.Adapter, seed: int) -> None:
    pred = run("agent", MockLM(seed=seed), adapter)
    trajectory = pred.trajectory
    steps = sorted(int(k.rsplit("_", 1)[1]) for k in trajectory if k.startswith("tool_name_"))
    assert steps == list(range(len(steps))) and 2 <= len(steps) <= 3, trajectory
    assert trajectory[f"tool_name_{steps[-1]}"] == "finish"
    tools = {name: dspy.Tool(getattr(agent, name)) for name in agent.__all__ if name != "make_agent"}
    for i in steps[:-1]:
        name, args, observation = (trajectory[f"{k}_{i}"] for k in ("tool_name", "tool_args", "observation"))
        assert name in tools, trajectory
        assert not (isinstance(observation, str) and observation.startswith("Execution error")), observation
        assert observation == tools[name](**args)  # the tool really ran on these arguments
    check_outputs("agent", pred)


def test_agent_search_tool_gets_the_question() -> None:
    """A string argument is filled from the task's inputs, so a search tool searches for the question."""
    seen = 0
    for seed in range(12):
        trajectory = run("agent", MockLM(seed=seed), ADAPTERS[0]).trajectory
        for i in range(3):
            if trajectory.get(f"tool_name_{i}") == "search_veshan":
                assert trajectory[f"tool_args_{i}"] == {"query": INPUTS["agent"]["question"]}
                assert any("Port Ellery" in p or "Greymaw" in p for p in trajectory[f"observation_{i}"])
                seen += 1
    assert seen > 0


@pytest.mark.parametrize("adapter", ADAPTERS, ids=ADAPTER_IDS)
def test_multihop_loops_over_its_two_predictors(adapter: dspy.Adapter) -> None:
    lm = MockLM()
    pred = run("multihop", lm, adapter)
    hops = programs.Hop().num_hops
    assert lm.calls == 2 * hops > 1
    signatures = [tuple(mockgen.parse_prompt(h["messages"]).output_fields) for h in lm.history]
    assert signatures == [("reasoning", "query"), ("reasoning", "new_notes", "titles")] * hops
    assert len(pred.notes) >= hops  # notes accumulate across hops


def test_refine_retries_with_feedback_until_the_reward_passes() -> None:
    assert one_word_answer({}, dspy.Prediction(answer="1742")) == 1.0
    assert one_word_answer({}, dspy.Prediction(answer="in 1742")) == 0.0
    lm = MockLM()  # mock answers are three words: the reward never reaches the threshold
    pred = run("best_answer", lm, ADAPTERS[0])
    assert isinstance(pred.answer, str) and len(pred.answer.split()) > 1
    assert lm.calls == 3 + 2  # N attempts and feedback between them
    one_word = MockLM(scripted={"*": {"answer": "1742"}})
    pred = run("best_answer", one_word, ADAPTERS[1])
    assert pred.answer == "1742" and one_word.calls == 1
