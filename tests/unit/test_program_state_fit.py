"""Program state must fit the module it is loaded into: a predictor the module lacks is refused, never ignored."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dspy
import pytest

from dspex_tasks import errors
from dspex_tasks.dsl.signature import MODULE_PREDICTORS, MODULES, Signature, SignatureRegistry, registry, signature
from dspex_tasks.gateway.models import ProgramPut
from dspex_tasks.gateway.problems import Problem
from dspex_tasks.gateway.routers.programs import put_program
from dspex_tasks.programs.bridge import build_module
from dspex_tasks.programs.state import load_program
from dspex_tasks.programs.store import MemoryProgramStore
from dspex_tasks.testing.mock_lm import MockLM
from dspex_tasks.testing.mockgen import follow_demos

pytestmark = pytest.mark.unit

DEMOS = [{"question": "Capital of France?", "answer": "Paris"}, {"question": "Capital of Peru?", "answer": "Lima"}]


def sig(module: str = "predict", name: str = "fit_qa") -> Signature:
    return signature("question: str -> answer: str", name=name, module=module, register=False)


class RAG(dspy.Module):  # type: ignore[misc]
    """The DSPy tutorial's multi-predictor program."""

    def __init__(self) -> None:
        super().__init__()
        self.retrieve = dspy.Predict("question -> passages: list[str]")
        self.generate_answer = dspy.ChainOfThought("context, question -> answer")


def rag_state() -> dict[str, Any]:
    rag = RAG()
    rag.generate_answer.predict.demos = [dspy.Example(context="c", question="q", answer="a")]
    state: dict[str, Any] = json.loads(json.dumps(rag.dump_state()))
    return state


def dumped(s: Signature, tmp_path: Path | None = None) -> dict[str, Any]:
    """DSPy's own state of the module built for ``s`` with DEMOS: ``dump_state()``, or ``save()``'s file."""
    module = build_module(s)
    for _, predictor in module.named_predictors():
        predictor.demos = [dspy.Example(**d) for d in DEMOS]
    if tmp_path is None:
        state: dict[str, Any] = json.loads(json.dumps(module.dump_state()))
        return state
    module.save(str(tmp_path / "program.json"))
    saved: dict[str, Any] = json.loads((tmp_path / "program.json").read_text())
    return saved


def answer(s: Signature, module: Any, question: str) -> str:
    """Run ``module`` with a mock LM that answers from the demos in its prompt (and makes one up without)."""
    reg = SignatureRegistry()
    reg.add(s)
    lm = MockLM(registry=reg, scripted={s.name: follow_demos})
    with dspy.context(lm=lm):
        pred = module(question=question)
    assert lm.calls == 1
    return str(pred.answer)


# -- the module's predictors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", MODULES)
def test_module_predictors_are_the_names_dspy_gives_them(module: str) -> None:
    assert tuple(n for n, _ in build_module(sig(module)).named_predictors()) == MODULE_PREDICTORS[module]


# -- refused: predictors the module does not have ---------------------------------------------------------------
@pytest.mark.parametrize("module", MODULES)
def test_a_multi_predictor_state_is_refused_naming_the_predictors(module: str) -> None:
    state = rag_state()
    assert set(state) == {"retrieve", "generate_answer.predict"}
    with pytest.raises(errors.ValidationError) as info:
        load_program(sig(module), state)
    has = MODULE_PREDICTORS[module][0]
    assert [e["field"] for e in info.value.errors] == ["retrieve", "generate_answer.predict"]
    for e in info.value.errors:
        assert f"unknown predictor '{e['field']}'" in e["message"] and f"'{has}'" in e["message"]
        assert "signature 'fit_qa'" in e["message"]
    assert "retrieve" in str(info.value) and "generate_answer.predict" in str(info.value)


def test_an_unknown_predictor_next_to_a_known_one_is_refused() -> None:
    state = {"predict": {"demos": DEMOS}, "retrieve": {"demos": [], "signature": {"instructions": "x"}}}
    with pytest.raises(errors.ValidationError) as info:
        load_program(sig("chain_of_thought"), state)
    assert [e["field"] for e in info.value.errors] == ["retrieve"]


@pytest.mark.parametrize(("module", "state", "field"), [
    ("predict", {"self": [1, 2]}, "self"),
    ("chain_of_thought", {"predict": "demos"}, "predict"),
    ("chain_of_thought", {"self": None}, "self"),
])
def test_a_predictor_key_that_holds_no_object_is_refused(module: str, state: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        load_program(sig(module), state)
    assert [e["field"] for e in info.value.errors] == [field]


@pytest.mark.parametrize(("module", "state"), [
    ("chain_of_thought", {"demos": [DEMOS[1]], "predict": {"demos": [DEMOS[0]]}}),  # its own state first
    ("predict", {"self": {"demos": [DEMOS[0]]}, "predict": {"demos": [DEMOS[1]]}}),  # then its own name
    ("chain_of_thought", {"self": {"demos": [DEMOS[1]]}, "predict": {"demos": [DEMOS[0]]}}),
])
def test_a_predictor_takes_its_own_state_before_the_short_form(module: str, state: dict[str, Any]) -> None:
    (_, predictor), = load_program(sig(module), state).named_predictors()
    assert [dict(d) for d in predictor.demos] == [DEMOS[0]]


# -- accepted: DSPy's own layouts, and the demos are used ------------------------------------------------------------
@pytest.mark.parametrize("saved", [False, True], ids=["dump_state", "save"])
@pytest.mark.parametrize("module", MODULES)
def test_dspy_state_of_predict_and_chain_of_thought_loads_and_its_demos_are_used(
        module: str, saved: bool, tmp_path: Path) -> None:
    s = sig(module)
    state = dumped(s, tmp_path if saved else None)
    assert ("metadata" in state) == saved  # DSPy's save() adds dependency versions; they are accepted
    if module == "predict":
        assert {"demos", "signature"} <= set(state)  # a Predict is its own predictor: its state at the top
    else:
        assert set(state) - {"metadata"} == {"predict"}
    loaded = load_program(s, state)
    (_, predictor), = loaded.named_predictors()
    assert [dict(d) for d in predictor.demos] == DEMOS
    assert answer(s, loaded, "Capital of Peru?") == "Lima"
    assert answer(s, build_module(s), "Capital of Peru?") != "Lima"  # without the demos: a made-up answer


@pytest.mark.parametrize(("source", "target"), [("predict", "chain_of_thought"), ("chain_of_thought", "predict")])
def test_either_single_predictor_layout_fits_the_other_module(source: str, target: str) -> None:
    s = sig(target)
    loaded = load_program(s, dumped(sig(source)))
    (_, predictor), = loaded.named_predictors()
    assert [dict(d) for d in predictor.demos] == DEMOS
    assert answer(s, loaded, "Capital of France?") == "Paris"


@pytest.mark.parametrize("state", [
    {"demos": DEMOS, "instructions": "Be terse."},
    {"self": {"demos": DEMOS}},
    {"demos": DEMOS, "metadata": {"dependency_versions": {"python": "3.11", "dspy": "3.4.1"}}},
    {"demos": DEMOS, "lm": {"model": "openai/evil"}, "notes": "not an object: ignored"},
])
def test_short_forms_still_load(state: dict[str, Any]) -> None:
    loaded = load_program(sig(), state)
    (_, predictor), = loaded.named_predictors()
    assert [dict(d) for d in predictor.demos] == DEMOS and predictor.lm is None


# -- the store refuses before it writes ---------------------------------------------------------------------------
@pytest.fixture
def store() -> MemoryProgramStore:
    reg = SignatureRegistry()
    reg.add(sig("chain_of_thought", name="fit_qa"))
    return MemoryProgramStore(signatures=reg)


def test_a_refused_put_writes_no_version(store: MemoryProgramStore) -> None:
    with pytest.raises(errors.ValidationError) as info:
        store.put("s1", "p1", rag_state(), signature="fit_qa", token="t1")
    assert [e["field"] for e in info.value.errors] == ["retrieve", "generate_answer.predict"]
    assert "'predict'" in info.value.errors[0]["message"]
    assert store.history("s1", "p1") == [] and store.current_version("s1", "p1") == 0
    assert store.list("s1") == [] and store.sessions() == []
    # the same token with a fitting state writes version 1: the refused put recorded nothing
    assert store.put("s1", "p1", dumped(sig("chain_of_thought")), signature="fit_qa", token="t1") == 1


def test_the_program_name_stands_for_the_signature_when_none_is_given(store: MemoryProgramStore) -> None:
    with pytest.raises(errors.ValidationError):
        store.put("s1", "fit_qa", rag_state())
    assert store.history("s1", "fit_qa") == []


def test_states_for_signatures_the_store_does_not_know_are_stored(store: MemoryProgramStore) -> None:
    assert store.put("s1", "other", rag_state(), signature="elsewhere") == 1


def test_the_store_checks_against_the_process_wide_registry_by_default() -> None:
    s = signature("question: str -> answer: str", name="fit_registered")
    try:
        with pytest.raises(errors.ValidationError, match="retrieve"):
            MemoryProgramStore().put("s1", "p", rag_state(), signature="fit_registered")
    finally:
        registry.remove(s.name)


# -- the gateway's PUT refuses with a problem before it writes ----------------------------------------------------
def test_gateway_put_refuses_a_state_the_published_module_cannot_load() -> None:
    memory = MemoryProgramStore(signatures=SignatureRegistry())  # the gateway's process defines no signatures
    published = {"fit_qa": sig("chain_of_thought").describe()}
    gw = SimpleNamespace(signatures=published, client=SimpleNamespace(programs=memory))
    with pytest.raises(Problem) as info:
        put_program("s1", "p1", ProgramPut(state=rag_state(), signature="fit_qa"), gw)  # type: ignore[arg-type]
    assert info.value.status == 422
    assert [(e["field"], e["pointer"]) for e in info.value.errors or []] == [
        ("state.retrieve", "/state/retrieve"), ("state.generate_answer.predict", "/state/generate_answer.predict")]
    assert memory.sessions() == [] and memory.history("s1", "p1") == []
    # the program's name stands for the signature when none is given
    with pytest.raises(Problem):
        put_program("s1", "fit_qa", ProgramPut(state=rag_state()), gw)  # type: ignore[arg-type]
    assert memory.sessions() == []
    ok = put_program("s1", "p1", ProgramPut(state=dumped(sig("chain_of_thought")), signature="fit_qa"), gw)  # type: ignore[arg-type]
    assert ok.version == 1


# -- the gateway's document says what the check accepts ---------------------------------------------------------
@pytest.mark.parametrize("state", [
    {}, {"demos": DEMOS}, {"self": {"demos": DEMOS}}, {"predict": {"demos": DEMOS}, "metadata": {"x": 1}},
    {"demos": [], "lm": {"model": "m"}, "notes": 1}, {"retrieve": {"demos": []}}, {"predict": 1}, {"self": None},
    rag_state(),
])
@pytest.mark.parametrize("module", MODULES)
def test_the_published_state_schema_accepts_what_the_check_accepts(state: dict[str, Any], module: str) -> None:
    import jsonschema

    from dspex_tasks.gateway.openapi import _program_state_schema
    from dspex_tasks.programs.store import predictor_states

    assert all(len(p) == 1 for p in MODULE_PREDICTORS.values())  # the document assumes one predictor
    try:
        predictor_states(state, MODULE_PREDICTORS[module])
        accepted = True
    except errors.ValidationError:
        accepted = False
    assert jsonschema.Draft202012Validator(_program_state_schema()).is_valid(state) == accepted
