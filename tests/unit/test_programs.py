"""Program state is loaded as JSON into modules built from code, and nothing else is taken from it."""

from __future__ import annotations

import pytest

from dspex_tasks import errors
from dspex_tasks.dsl.signature import signature
from dspex_tasks.programs.state import dump_program, load_program

pytestmark = pytest.mark.unit


@pytest.fixture
def qa():  # type: ignore[no-untyped-def]
    return signature("question: str -> answer: str", name="prog_qa", register=False)


def test_short_form_sets_demos_and_instructions(qa) -> None:  # type: ignore[no-untyped-def]
    module = load_program(qa, {"demos": [{"question": "q", "answer": "a"}], "instructions": "Be terse."})
    (_, pred), = module.named_predictors()
    assert [dict(d) for d in pred.demos] == [{"question": "q", "answer": "a"}]
    assert pred.signature.instructions == "Be terse."


def test_dump_state_round_trip_drops_lm(qa) -> None:  # type: ignore[no-untyped-def]
    module = load_program(qa, {"demos": [{"question": "q", "answer": "a"}]})
    state = dump_program(module)
    assert "lm" not in str(state.keys()) and load_program(qa, state).named_predictors()[0][1].demos


def test_lm_endpoints_and_unknown_keys_in_state_are_ignored(qa) -> None:  # type: ignore[no-untyped-def]
    hostile = {
        "demos": [],
        "lm": {"model": "openai/evil", "api_base": "http://attacker.invalid", "_dspy_lm_class": "os.system"},
        "forward": "not a method",
        "signature": {"instructions": "ok", "fields": []},
    }
    module = load_program(qa, hostile)
    (_, pred), = module.named_predictors()
    assert pred.lm is None
    assert callable(pred.forward)
    assert pred.signature.instructions == "ok"


def test_bad_demos_are_a_validation_error(qa) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.ValidationError) as info:
        load_program(qa, {"demos": ["not an object"]})
    assert info.value.errors[0]["field"].endswith("demos")
