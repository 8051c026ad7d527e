"""The ``gepa`` optimizer: params, metric results, GEPA's state as JSON, and resuming from it (mock LM, no Redis)."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import dspy
import pytest

from dspex_tasks import errors
from dspex_tasks.optimize.metrics import metric_feedback, metric_score, scoring
from dspex_tasks.optimize.optimizers import (
    CompileContext,
    accepts_ctx,
    gepa,
    get_optimizer,
    params_schemas,
    parse_common,
)
from dspex_tasks.optimize.params import check_params
from dspex_tasks.testing import mockgen
from dspex_tasks.testing.mock_lm import MockLM

pytestmark = pytest.mark.unit


# -- params ------------------------------------------------------------------------------------------------
def refused_fields(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The fields the worker's check names, and those the client's (published JSON Schema) names."""
    with pytest.raises(errors.ValidationError) as worker:
        get_optimizer("gepa").parse_params(params)
    schema = json.loads(json.dumps(params_schemas()["gepa"]))
    try:
        check_params(params, "gepa", schema)
    except errors.ValidationError as client:
        return [e["field"] for e in worker.value.errors], [e["field"] for e in client.errors]
    return [e["field"] for e in worker.value.errors], []


@pytest.mark.parametrize(("params", "field"), [
    ({"auto": "light", "max_metric_calls": 10}, "params.max_metric_calls"),
    ({"auto": "heavy", "max_full_evals": 2}, "params.max_full_evals"),
    ({"max_full_evals": 2, "max_metric_calls": 50}, "params.max_metric_calls"),
    ({"max_metric_calls": 0}, "params.max_metric_calls"),
    ({"auto": "huge"}, "params.auto"),
    ({"perfect_score": 0.0}, "params.perfect_score"),
    ({"reflection_minibatch_size": 0}, "params.reflection_minibatch_size"),
])
def test_bad_budgets_and_params_name_their_field_on_worker_and_client(params: dict[str, Any], field: str) -> None:
    worker, client = refused_fields(params)
    assert worker == [field]
    # perfect_score > failure_score: a rule the published schema does not carry; the worker's check does
    assert client == ([] if field == "params.perfect_score" else [field])


def test_worker_message_says_which_budgets_clash_and_typos_get_a_did_you_mean() -> None:
    with pytest.raises(errors.ValidationError) as info:
        get_optimizer("gepa").parse_params({"auto": "light", "max_metric_calls": 10})
    assert "give one budget: max_metric_calls or auto" in info.value.errors[0]["message"]
    with pytest.raises(errors.ValidationError) as info:
        get_optimizer("gepa").parse_params({"max_metric_call": 10})
    assert "did you mean 'max_metric_calls'?" in info.value.errors[0]["message"]


def test_budget_is_the_one_given_else_auto_light() -> None:
    parse = get_optimizer("gepa").parse_params
    assert parse({}).budget() == {"auto": "light"}
    assert parse({"auto": "medium"}).budget() == {"auto": "medium"}
    assert parse({"max_full_evals": 3}).budget() == {"max_full_evals": 3}
    assert parse({"auto": None, "max_metric_calls": 40}).budget() == {"max_metric_calls": 40}
    schema = params_schemas()["gepa"]
    check_params({"auto": None, "max_metric_calls": 40, "seed": 1}, "gepa", schema)  # null is "not given"
    check_params({"max_full_evals": 2, "max_metric_calls": None}, "gepa", schema)
    assert "exactly one of" in schema["properties"]["auto"]["description"]
    # the progress estimate follows the budget
    est = get_optimizer("gepa").estimate
    assert est(10, 5, parse({"max_metric_calls": 60})) == 70
    assert est(10, 5, parse({"max_full_evals": 2})) == 35
    assert est(10, 5, parse({})) > 5


# -- metric results ------------------------------------------------------------------------------------------
def test_metric_results_become_numbers_and_feedback() -> None:
    assert [metric_score(v) for v in (True, False, 1, 0.25)] == [1.0, 0.0, 1.0, 0.25]
    assert metric_score({"score": 0.5, "feedback": "half"}) == 0.5
    assert metric_score(dspy.Prediction(score=True, feedback="yes")) == 1.0
    assert metric_feedback({"score": 0.5, "feedback": "half"}) == "half"
    assert metric_feedback(dspy.Prediction(score=1.0, feedback="yes")) == "yes"
    assert metric_feedback(0.5) is None and metric_feedback({"score": 1, "feedback": "  "}) is None
    with pytest.raises(TypeError, match="a metric returned dict"):
        metric_score({"feedback": "no score"})
    with pytest.raises(TypeError, match="returned str"):
        metric_score("high")

    def judged(example: Any, prediction: Any, trace: Any = None) -> dict[str, Any]:
        return {"score": 0.0, "feedback": "wrong"}

    # BootstrapFewShot reads the result as a truth value: a dict would always pass; the wrapper gives 0.0
    assert scoring(judged)({}, {}) == 0.0 and scoring(judged).__name__ == "judged"


def test_gepa_metric_has_five_arguments_and_always_feedback() -> None:
    gold = dspy.Example(question="q", answer="A").with_inputs("question")
    pred = dspy.Prediction(answer="B")
    plain = gepa.feedback_metric(lambda e, p, t=None: 0.0)(gold, pred, None, "self", [])
    assert plain.score == 0.0 and plain.feedback == "This output scored 0.000. Expected answer: 'A'."
    given = gepa.feedback_metric(lambda e, p, t=None: {"score": 1, "feedback": "fine"})(gold, pred, None, None, None)
    assert (given.score, given.feedback) == (1.0, "fine")


# -- GEPA's state as JSON ------------------------------------------------------------------------------------
def odd_state() -> Any:
    """A GEPAState with every kind of value the codec must keep: int keys, sets, tuple keys, tuples, inf."""
    from gepa.core.state import GEPAState, ValsetEvaluation

    state = GEPAState({"self": "Answer."}, ValsetEvaluation({0: "a", 1: "b"}, {0: 0.0, 1: 1.0}))
    state.num_full_ds_evals, state.total_num_evals, state.i = 1, 2, 0
    state.update_state_with_new_program([0], {"self": "Answer well."}, ValsetEvaluation({}, {0: 1.0, 1: 1.0}),
                                        None, 2)
    state.pareto_front_cartesian = {(0, "acc"): 1.0, (1, "acc"): float("-inf")}
    state.program_at_pareto_front_cartesian = {(0, "acc"): {0, 1}, (1, "acc"): set()}
    state.adapter_state = {"rng_state": random.Random(7).getstate()}
    state.full_program_trace = [{"i": 0, "subsample_ids": [1, 0], "merged_entities": (0, 1, "x"), "$odd": True}]
    state.add_budget_hook(lambda total, delta: None)  # runtime-only: left out
    return state


def comparable(state: Any) -> dict[str, Any]:
    return {k: v for k, v in state.__dict__.items() if k != "_budget_hooks"}


def test_state_json_round_trip_equals_the_original_state() -> None:
    state = odd_state()
    data = json.loads(json.dumps(gepa.state_to_json(state), allow_nan=False))  # strict JSON, as stored
    restored = gepa.state_from_json(data)
    assert comparable(restored) == comparable(state)
    assert restored.pareto_front_cartesian[(1, "acc")] == -math.inf
    assert isinstance(restored.adapter_state["rng_state"], tuple)
    assert random.Random().setstate(restored.adapter_state["rng_state"]) is None  # a usable RNG state
    assert restored.program_at_pareto_front_valset == {0: {1}, 1: {0, 1}}
    assert "_budget_hooks" not in data


def test_state_of_a_real_run_round_trips_and_outputs_are_left_out() -> None:
    seen: list[Any] = []

    class Keep:
        def on_iteration_end(self, event: Any) -> None:
            seen.append(event["state"])

    lm = MockLM(scripted={"*": mockgen.learns_from_instructions})
    rows = examples(8)
    with dspy.context(lm=lm):
        dspy.GEPA(metric=gepa.feedback_metric(rule_feedback), max_metric_calls=20, reflection_lm=lm, num_threads=2,
                  track_stats=True, track_best_outputs=True,
                  gepa_kwargs={"callbacks": [Keep()]}).compile(predictor(), trainset=rows[:4], valset=rows[4:])
    state = seen[-1]
    assert state.best_outputs_valset  # program outputs (dspy.Prediction): not JSON, so not kept
    restored = gepa.state_from_json(json.loads(json.dumps(gepa.state_to_json(state))))
    assert restored.best_outputs_valset is None
    assert {k: v for k, v in comparable(restored).items() if k != "best_outputs_valset"} == \
        {k: v for k, v in comparable(state).items() if k != "best_outputs_valset"}


def test_codec_keeps_tags_bools_and_odd_keys_apart() -> None:
    value = {"$tuple": [1], "plain": {"a": (1, [2, {3}])}, 5: True, (1, "x"): frozenset({1}), "n": float("nan")}
    back = gepa.decode(json.loads(json.dumps(gepa.encode(value), allow_nan=False)))
    assert back.keys() == value.keys() and back[5] is True and back[(1, "x")] == {1} and math.isnan(back["n"])
    assert back["$tuple"] == [1] and back["plain"] == {"a": (1, [2, {3}])}
    with pytest.raises(TypeError, match="cannot keep a Prediction"):
        gepa.encode({"out": dspy.Prediction(answer="x")})
    with pytest.raises(ValueError, match="not a consistent GEPA state"):
        gepa.state_from_json({**gepa.state_to_json(odd_state()), "num_metric_calls_by_discovery": [0]})


# -- compile, events, resume ---------------------------------------------------------------------------------
def examples(n: int) -> list[Any]:
    return [dspy.Example(question=f"q {i}", answer=mockgen.rule_answer({"question": f"q {i}"}))
            .with_inputs("question") for i in range(n)]


def predictor() -> Any:
    return dspy.Predict(dspy.Signature("question: str -> answer: str", "Answer the question."))


def rule_feedback(example: Any, prediction: Any, trace: Any = None) -> dict[str, Any]:
    ok = prediction.answer == example.answer
    return {"score": float(ok), "feedback": "Correct." if ok else f"{mockgen.RULE_TEXT} Expected {example.answer!r}."}


class Ctx:
    """An in-memory CompileContext: checkpoints through JSON, as Redis keeps them."""

    def __init__(self, reflection: Any = None) -> None:
        self.saved: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []
        self.ctx = CompileContext("r" * 32, lambda **k: self.events.append(k),
                                  lambda name: json.loads(self.saved[name]) if name in self.saved else None,
                                  lambda name, data: self.saved.__setitem__(name, json.dumps(data)),
                                  lambda model: reflection)

    def state(self) -> dict[str, Any]:
        return json.loads(self.saved[gepa.STATE_CHECKPOINT])  # type: ignore[no-any-return]


def run_gepa(ctx: Ctx | None, budget: int, lm: MockLM) -> tuple[Any, list[float]]:
    opt = get_optimizer("gepa")
    rows = examples(12)
    with dspy.context(lm=lm):
        return opt.compile(predictor(), rows[:6], rows[6:], rule_feedback, opt.parse_params(
            {"max_metric_calls": budget}), parse_common({"num_threads": 4}), ctx=ctx.ctx if ctx else None)


def test_compile_emits_candidate_scores_and_wins_with_the_stated_rule() -> None:
    assert accepts_ctx(gepa.compile) and not accepts_ctx(lambda student, *a: None)
    ctx, lm = Ctx(), MockLM(scripted={"*": mockgen.learns_from_instructions})
    compiled, trials = run_gepa(ctx, 30, lm)
    assert trials == [0.0, 1.0]
    assert mockgen.RULE_TEXT in compiled.signature.instructions
    scored = [e for e in ctx.events if "candidate" in e]
    assert [(e["candidate"], e["score"]) for e in scored] == [(0, 0.0), (1, 1.0)]
    assert scored[1]["message"].startswith("iteration 1: candidate 1 (from 0) scored 1.0000")
    saved = ctx.state()
    assert saved["total_num_evals"] == saved["state"]["total_num_evals"] >= 30 and saved["max_metric_calls"] == 30
    assert saved["iteration"] == saved["state"]["i"] + 1 >= 2


def test_compile_resumes_from_its_checkpoint_instead_of_starting_over() -> None:
    # Given a run's checkpoint after a first attempt spent 30 metric calls
    lm = MockLM(scripted={"*": mockgen.learns_from_instructions})
    ctx = Ctx()
    run_gepa(ctx, 30, lm)
    first = ctx.state()
    before = lm.calls
    # When the compile runs again (a redelivery) with a budget of 60
    ctx.events.clear()
    compiled, trials = run_gepa(ctx, 60, lm)
    resumed_calls = lm.calls - before
    # Then it says it resumed, keeps the candidates, iteration counter and metric calls, and spends the rest only
    assert ctx.events[0]["message"] == (f"resuming GEPA after iteration {first['iteration']}: 2 candidates, "
                                        f"{first['total_num_evals']} metric calls used")
    final = ctx.state()
    assert final["iteration"] > first["iteration"] and 60 <= final["total_num_evals"] <= 63
    assert final["state"]["program_candidates"] == first["state"]["program_candidates"]
    assert trials == [0.0, 1.0] and mockgen.RULE_TEXT in compiled.signature.instructions
    fresh = MockLM(scripted={"*": mockgen.learns_from_instructions})
    run_gepa(None, 60, fresh)
    # the seed is re-scored on one example only: the rest of the budget, not a fresh run's
    assert resumed_calls <= 60 - first["total_num_evals"] + 1 + 3 < fresh.calls - 20


def test_a_checkpoint_of_another_program_is_ignored() -> None:
    ctx, lm = Ctx(), MockLM(scripted={"*": mockgen.learns_from_instructions})
    run_gepa(ctx, 20, lm)
    data = ctx.state()
    data["state"]["program_candidates"][0] = {"self": "Another seed."}
    ctx.saved[gepa.STATE_CHECKPOINT] = json.dumps(data)
    ctx.events.clear()
    run_gepa(ctx, 20, lm)
    assert not any("resuming" in str(e.get("message")) for e in ctx.events)
    assert ctx.state()["state"]["program_candidates"][0] == {"self": "Answer the question."}


def test_a_reflection_lm_that_always_fails_stops_gepa_and_fails_the_run() -> None:
    # Given a reflection LM that refuses every call (a wrong model or key, say)
    ctx = Ctx(reflection=MockLM(failure_rate=1.0))
    lm = MockLM(scripted={"*": mockgen.learns_from_instructions})
    # When GEPA runs, then it stops after a few failed reflections, not at the end of its budget, and fails typed
    with pytest.raises(errors.LMError, match=r"every reflection of the GEPA run failed \(\d\); the first: mock LM"):
        run_gepa(ctx, 500, lm)
    assert lm.calls <= 6 + 3 * 3  # the seed on the valset, then a minibatch per iteration (GEPA retries a reflection)
    assert sum("reflection failed (LMError)" in str(e.get("message")) for e in ctx.events) >= 3
