"""``program()``: any dspy.Module served like a signature: one registry, typed interfaces, checked state."""

from __future__ import annotations

from typing import Any, Literal

import dspy
import pydantic
import pytest

from dspex_tasks import errors, program
from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.programs.bridge import build_module
from dspex_tasks.programs.state import dump_program, load_program
from dspex_tasks.programs.store import MemoryProgramStore
from dspex_tasks.settings import Settings
from dspex_tasks.testing.mock_lm import MockLM
from dspex_tasks.worker.runtime import Runtime

pytestmark = pytest.mark.unit

PASSAGES = ["The Eiffel Tower is in Paris.", "Mount Fuji is in Japan.", "The Nile flows through Egypt."]


def search(query: str, k: int = 2) -> list[str]:
    words = set(query.lower().split())
    return sorted(PASSAGES, key=lambda p: -len(words & set(p.lower().rstrip(".").split())))[:k]


class MultiHop(dspy.Module):
    """Two predictors in a loop, as DSPy's multi-hop tutorial writes it."""

    def __init__(self, hops: int = 2) -> None:
        super().__init__()
        self.hops = hops
        self.generate_query = dspy.ChainOfThought("claim, notes -> query")
        self.answer = dspy.Predict("claim, notes -> verdict: bool")

    def forward(self, claim: str) -> dspy.Prediction:
        notes: list[str] = []
        for _ in range(self.hops):
            query = self.generate_query(claim=claim, notes=notes).query
            notes.extend(search(query))
        return self.answer(claim=claim, notes=notes)


class Person(pydantic.BaseModel):
    name: str
    role: Literal["author", "editor"]
    age: int | None = None


class ExtractPeople(dspy.Signature):
    """Extract the people mentioned in the text."""

    text: str = dspy.InputField()
    people: list[Person] = dspy.OutputField()


@pytest.fixture
def reg() -> SignatureRegistry:
    r = SignatureRegistry()
    program("multihop_u", interface="claim -> verdict: bool", registry=r)(MultiHop)
    program("extract_u", interface=ExtractPeople, registry=r)(lambda: dspy.Predict(ExtractPeople))
    return r


def runtime(reg: SignatureRegistry, store: MemoryProgramStore | None = None) -> tuple[Runtime, MockLM]:
    rt = Runtime(Settings(), store=store or MemoryProgramStore(), signatures=reg)
    lm = MockLM()
    rt._lms["mock"] = [lm]
    return rt, lm


def test_a_program_is_described_like_a_signature_with_kind_and_predictors(reg: SignatureRegistry) -> None:
    hop = reg.get("multihop_u")
    assert hop.kind == "program" and hop.spec == "claim: str -> verdict: bool"
    build_module(hop)  # a worker builds it once; then the predictors are known
    described = hop.describe()
    assert described["kind"] == "program"
    assert described["predictors"] == ["generate_query.predict", "answer"]
    qa = signature("question -> answer", name="qa_u", register=False, module="chain_of_thought")
    assert qa.describe()["kind"] == "signature" and qa.describe()["predictors"] == ["predict"]


def test_a_dspy_signature_class_gives_typed_validation_and_schemas(reg: SignatureRegistry) -> None:
    ext = reg.get("extract_u")
    assert ext.instructions == "Extract the people mentioned in the text."
    assert ext.to_dspy() is ExtractPeople
    assert ext.output_fields == {"people": "list[Person]"}
    schema = ext.output_schema()
    assert schema["properties"]["people"] == {"items": {"$ref": "#/$defs/Person"}, "type": "array"}
    assert schema["$defs"]["Person"]["properties"]["role"]["enum"] == ["author", "editor"]
    strict = ext.json_schema("openai")["json_schema"]["schema"]["$defs"]["Person"]
    assert strict["required"] == ["name", "role", "age"] and strict["additionalProperties"] is False
    with pytest.raises(errors.ValidationError) as info:
        ext.validate_outputs({"people": [{"name": "Ann", "role": "boss"}]})
    assert info.value.errors[0]["field"].startswith("people.0.role")
    assert ext.validate_outputs({"people": [Person(name="Ann", role="author")]}) == {
        "people": [{"name": "Ann", "role": "author", "age": None}]}


def test_names_are_one_namespace() -> None:
    r = SignatureRegistry()
    r.add(signature("q -> a", name="taken_u", register=False))
    with pytest.raises(errors.SignatureError, match="already taken by a signature"):
        program("taken_u", interface="q -> a", registry=r)(MultiHop)
    program("prog_u", interface="claim -> verdict: bool", registry=r)(MultiHop)
    program("prog_u", interface="claim -> verdict: bool", registry=r)(MultiHop)  # a reload: same definition

    def other() -> dspy.Module:
        return MultiHop()

    with pytest.raises(errors.SignatureError, match="already taken by program"):
        program("prog_u", interface="claim -> verdict: bool", registry=r)(other)


def test_what_a_worker_cannot_build_is_refused_at_definition() -> None:
    r = SignatureRegistry()

    class NeedsArgs(dspy.Module):
        def __init__(self, corpus: list[str]) -> None:
            super().__init__()

    with pytest.raises(errors.SignatureError, match="requires corpus"):
        program("needs_u", interface="q -> a", registry=r)(NeedsArgs)
    with pytest.raises(errors.SignatureError, match="not a dspy.Module subclass"):
        program("notmod_u", interface="q -> a", registry=r)(dict)
    with pytest.raises(errors.SignatureError, match="interface must be a spec"):
        program("badif_u", interface=42, registry=r)(MultiHop)
    program("factory_u", interface="q -> a", registry=r)(lambda: "not a module")
    with pytest.raises(errors.ConfigurationError, match="built str, not a dspy.Module"):
        build_module(r.get("factory_u"))


def test_a_worker_serves_a_program_with_typed_outputs_in_one_task(reg: SignatureRegistry) -> None:
    rt, lm = runtime(reg)
    res = rt.predict(reg.get("multihop_u"), {"claim": "The Eiffel Tower is in Paris."})
    assert isinstance(res["outputs"]["verdict"], bool)
    assert res["usage"]["lm_calls"] == 3  # two hops and the answer, all in this one task, each counted
    people = rt.predict(reg.get("extract_u"), {"text": "Ann wrote it; Bob edited it."})["outputs"]["people"]
    assert people and all(set(p) == {"name", "role", "age"} and p["role"] in ("author", "editor") for p in people)
    with pytest.raises(errors.ValidationError, match="claim"):
        rt.predict(reg.get("multihop_u"), {"question": "wrong field"})


def _state_with_demos(reg: SignatureRegistry) -> dict[str, Any]:
    module = build_module(reg.get("multihop_u"))
    module.generate_query.predict.demos = [dspy.Example(claim="c", notes=[], reasoning="r", query="q" * 400)]
    module.answer.demos = [dspy.Example(claim="c", notes=["n"], verdict=True)]
    return dump_program(module)


def test_a_stored_multi_predictor_state_changes_the_prompts(reg: SignatureRegistry) -> None:
    store = MemoryProgramStore(signatures=reg)
    rt, _ = runtime(reg, store)
    claim = {"claim": "Mount Fuji is in Japan."}
    before = rt.predict(reg.get("multihop_u"), claim, session="s0")
    store.put("s1", "multihop_u", _state_with_demos(reg))
    after = rt.predict(reg.get("multihop_u"), claim, session="s1")
    assert after["program_version"] == 1
    # the 400-character query demo is in both query prompts now
    assert after["usage"]["prompt_tokens"] > before["usage"]["prompt_tokens"] + 100


def test_state_that_does_not_fit_the_predictors_is_refused_and_nothing_is_written(reg: SignatureRegistry) -> None:
    store = MemoryProgramStore(signatures=reg)
    good = _state_with_demos(reg)
    unknown = {**good, "retrieve": {"demos": []}}
    missing = {k: v for k, v in good.items() if k != "answer"}
    malformed = {**good, "answer": {"demos": "notalist"}}
    with pytest.raises(errors.ValidationError) as info:
        store.put("s1", "multihop_u", unknown)
    assert [e["field"] for e in info.value.errors] == ["retrieve"]
    assert "'generate_query.predict', 'answer'" in info.value.errors[0]["message"]
    with pytest.raises(errors.ValidationError) as info:
        store.put("s1", "multihop_u", missing)
    assert [e["field"] for e in info.value.errors] == ["answer"]
    with pytest.raises(errors.ValidationError) as info:
        store.put("s1", "multihop_u", {"demos": [], "instructions": "x"})  # the short form fits one predictor
    assert {e["field"] for e in info.value.errors} == {"generate_query.predict", "answer"}
    assert store.history("s1", "multihop_u") == []
    with pytest.raises(errors.ValidationError, match="answer.demos"):
        load_program(reg.get("multihop_u"), malformed)
    assert store.put("s1", "multihop_u", good) == 1


def test_dspy_save_json_loads_as_is(reg: SignatureRegistry, tmp_path: Any) -> None:
    import json

    module = build_module(reg.get("multihop_u"))
    module.answer.demos = [dspy.Example(claim="c", notes=["n"], verdict=True)]
    module.save(str(tmp_path / "hop.json"))  # DSPy's own file, with its metadata
    state = json.loads((tmp_path / "hop.json").read_text())
    assert "metadata" in state
    loaded = load_program(reg.get("multihop_u"), state)
    assert [dict(d) for d in loaded.answer.demos] == [{"claim": "c", "notes": ["n"], "verdict": True}]
