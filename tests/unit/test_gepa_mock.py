"""The mock LM's side of GEPA: reflection prompts get a deterministic new instruction carrying the feedback, and
the ``learns_from_instructions`` scenario follows a rule once the instructions state it."""

from __future__ import annotations

import json
from typing import Any

import dspy
import pytest
from dspy.teleprompt.gepa.instruction_proposal import ProposeInstruction
from gepa.strategies.instruction_proposal import InstructionProposalSignature

from dspex_tasks.testing import mockgen
from dspex_tasks.testing.mock_lm import MockLM

pytestmark = pytest.mark.unit

CURRENT = "Answer the question."
EXAMPLES = [
    {"Inputs": {"question": "q 1"}, "Generated Outputs": {"answer": "mock-1"},
     "Feedback": f"{mockgen.RULE_TEXT} Expected '1 Q'."},
    {"Inputs": {"question": "q 2"}, "Generated Outputs": {"answer": "mock-2"},
     "Feedback": f"{mockgen.RULE_TEXT}   Expected '2 Q'."},
    {"Inputs": {"question": "q 2"}, "Generated Outputs": {"answer": "mock-2"},
     "Feedback": f"{mockgen.RULE_TEXT} Expected '2 Q'."},  # the same lesson (spacing aside): listed once
]


def reflection_messages(adapter: Any, current: str = CURRENT) -> list[dict[str, Any]]:
    """dspy's GEPA reflection prompt, as its instruction proposer formats it."""
    return adapter.format(ProposeInstruction, [], {"current_instruction": current, "examples_with_feedback": EXAMPLES})


@pytest.mark.parametrize("adapter", [dspy.JSONAdapter(), dspy.ChatAdapter()], ids=["json", "chat"])
def test_reflection_prompt_gets_the_instruction_plus_the_feedback(adapter: Any) -> None:
    messages = reflection_messages(adapter)
    first = mockgen.answer(messages, seed=0)
    # deterministic: same prompt, same answer, whatever the seed
    assert mockgen.answer(messages, seed=0) == first == mockgen.answer(messages, seed=5)
    new = adapter.parse(ProposeInstruction, first)["new_instruction"]
    assert new == (f"{CURRENT}\n\n- {mockgen.RULE_TEXT} Expected '1 Q'.\n- {mockgen.RULE_TEXT} Expected '2 Q'.")
    # a lesson the instruction already holds is not added again
    assert mockgen.reflect_instruction(new, [e["Feedback"] for e in EXAMPLES]) == new


def test_reflection_as_structured_output_and_plain_gepa_template() -> None:
    schema = {"type": "object", "properties": {"new_instruction": {"type": "string"}}}
    structured = json.loads(mockgen.answer_for_schema(reflection_messages(dspy.JSONAdapter()), schema))
    assert structured["new_instruction"].startswith(CURRENT) and mockgen.RULE_TEXT in structured["new_instruction"]
    # gepa's own template (a plain prompt; the answer goes in a ``` block, which gepa extracts)
    prompt = InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": CURRENT, "dataset_with_feedback": EXAMPLES})
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    reply = mockgen.answer([{"role": "user", "content": text}])
    assert reply == mockgen.answer([{"role": "user", "content": text}])
    extracted = InstructionProposalSignature.output_extractor(reply)["new_instruction"]
    assert extracted.startswith(CURRENT) and mockgen.RULE_TEXT in extracted
    # any other plain prompt still gets hash text
    assert mockgen.answer([{"role": "user", "content": "hello"}]).startswith("mock-")


def test_learns_from_instructions_follows_the_rule_only_once_stated() -> None:
    assert {"learns_from_instructions", "learns", "learns_from_demos"} <= set(mockgen.SCENARIOS)
    lm = MockLM(scripted={"*": mockgen.SCENARIOS["learns_from_instructions"]})
    plain = dspy.Predict(dspy.Signature("question: str -> answer: str", CURRENT))
    taught = dspy.Predict(dspy.Signature("question: str -> answer: str",
                                         f"{CURRENT}\n\n- {mockgen.RULE_TEXT.replace(' ', '  ')} Expected 'X'."))
    with dspy.context(lm=lm):
        assert plain(question="abc").answer != "CBA"
        assert taught(question="abc").answer == "CBA" == mockgen.rule_answer({"question": "abc"})
    # the combined scenario: demos help too
    both = MockLM(scripted={"*": mockgen.SCENARIOS["learns"]})
    plain.demos = [dspy.Example(question="x", answer="X")]
    with dspy.context(lm=both):
        assert plain(question="abc").answer == "CBA"


def test_http_mock_server_switches_to_the_scenario() -> None:
    from dspex_tasks.testing.mock_server import MockLMServer

    server = MockLMServer(port=0).start()
    try:
        assert server.control(scenario="learns_from_instructions")["scenario"] == "learns_from_instructions"
        lm = dspy.LM("openai/mock", api_base=server.url, api_key="sk-test", cache=False, num_retries=0)
        taught = dspy.Predict(dspy.Signature("question: str -> answer: str", mockgen.RULE_TEXT))
        with dspy.context(lm=lm):
            assert taught(question="abc").answer == "CBA"
    finally:
        server.stop()
