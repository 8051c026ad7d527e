"""``gepa``: DSPy's GEPA (reflective prompt evolution), with candidate events and a resumable state.

GEPA evolves each predictor's instructions. It runs the program on a minibatch of the trainset,
shows a reflection LM the inputs, the outputs and the metric's feedback, takes the instruction it
proposes, and keeps a candidate that does better on the minibatch once it is scored on the whole
valset. The best candidate on the valset is the run's candidate.

Metric: a registered metric may return ``{"score", "feedback"}`` (or ``dspy.Prediction(score=...,
feedback=...)``); the feedback is what the reflection LM reads. A metric returning a number gets a
generic text (its score and the example's expected outputs).

Reflection LM: ``params.reflection_lm`` (one of the fleet's configured models: ``DSPEX_LM``,
``DSPEX_REFLECTION_LM``, ``DSPEX_LM_FALLBACKS``; a client never picks what the workers' keys pay for),
else ``DSPEX_REFLECTION_LM``, else the task's own LM; a named model is built as the worker's governed LM (usage ledger, rate limits, cache), and with the mock LM
configured it is that same mock (``optimizers.reflection_lm``).

Events: each candidate GEPA scores on the valset (the seed program first) is a ``compile`` event with
its ``score``, ``candidate`` (index), ``iteration`` and ``metric_calls`` (used so far). The run's
``trials`` are the candidates' valset scores, in discovery order.

Where it runs: in the run's compile stage, except the scoring of candidates on the valset (``capture_traces``
off, more than one ``eval_chunk_size`` of rows), which fans out as compile chunks to every optimize worker with
work stealing (:func:`install_fanout_hook`, :meth:`CompileContext.fan_out`; ``params.fanout``).

Resume: after every iteration GEPA's state (``gepa.core.state.GEPAState``) is written as JSON to the
run checkpoint ``compile:gepa_state`` (replaced each time; never GEPA's own pickle under ``log_dir``).
A compile stage delivered again after its worker died loads it: GEPA's engine builds its state with
``initialize_gepa_state``, which :func:`install_resume_hook` wraps, once per process, to hand back the
restored state while this module's compile holds one (a ContextVar). The run then continues at the
next iteration with the metric calls it has left, and re-scores the seed program on one valset
example only (GEPA scores the seed before it reads any state; that score is then discarded).

What survives a resume: every candidate and its per-example valset scores, lineage, the Pareto
fronts, the iteration counter (``i``), the metric calls used (``total_num_evals``: the budget goes on
where it stopped), each candidate's discovery budget, the next component to update, the program
trace, and the adapter's random state as of the start of the last finished iteration.
What does not: the iteration in flight when the worker died (redone; its metric calls are spent
again), the merge proposer's bookkeeping (merges due and tested start over), the random generator
GEPA shares between candidate selection, minibatch sampling and merges (it restarts from the seed,
so the resumed run draws differently from an uninterrupted one), the evaluation cache and best
outputs (program outputs, not JSON; both off here), and the killed attempt's LM-call count and
usage (the run's ``lm_calls`` counts the finishing attempt's calls only).
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import math
import threading
from typing import Any, Literal

import pydantic

from ...errors import DspexError
from . import CompileContext, Optimizer, register, register_chunk_handler

log = logging.getLogger(__name__)

#: The run checkpoint (``CompileContext.save``) holding GEPA's state as JSON.
STATE_CHECKPOINT = "gepa_state"
STATE_FORMAT = 1
#: With this many reflections failed and none done, GEPA stops and the run fails (not spending its budget).
FAILED_REFLECTIONS_TO_STOP = 3
_BUDGETS = ("auto", "max_full_evals", "max_metric_calls")
#: The client's check (JSON Schema) refuses a second budget too, naming its field.
_ONE_BUDGET: dict[str, Any] = {"allOf": [
    {"if": {"properties": {"auto": {"type": "string"}}, "required": ["auto"]},
     "then": {"properties": {"max_full_evals": {"type": "null"}, "max_metric_calls": {"type": "null"}}}},
    {"if": {"properties": {"max_full_evals": {"type": "integer"}}, "required": ["max_full_evals"]},
     "then": {"properties": {"max_metric_calls": {"type": "null"}}}},
]}


class Params(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", json_schema_extra=_ONE_BUDGET)
    auto: Literal["light", "medium", "heavy"] | None = pydantic.Field(
        None, description="budget preset (dspy.GEPA's auto); the budget is exactly one of auto, max_full_evals "
                          "and max_metric_calls, and 'light' when none is given")
    max_full_evals: int | None = pydantic.Field(
        None, ge=1, le=1000, description="budget in full evaluations of trainset + valset (instead of auto)")
    max_metric_calls: int | None = pydantic.Field(
        None, ge=1, le=1_000_000, description="budget in metric calls, i.e. program runs (instead of auto)")
    reflection_lm: str | None = pydantic.Field(
        None, min_length=1, max_length=200,
        description="model that proposes instructions; default DSPEX_REFLECTION_LM, else the task's LM")
    reflection_minibatch_size: int = pydantic.Field(3, ge=1, le=64, description="trainset examples per reflection")
    candidate_selection_strategy: Literal["pareto", "current_best"] = "pareto"
    component_selector: Literal["round_robin", "all"] = pydantic.Field(
        "round_robin", description="which predictors each iteration updates")
    skip_perfect_score: bool = pydantic.Field(True, description="no reflection on a minibatch scored perfect")
    add_format_failure_as_feedback: bool = False
    use_merge: bool = True
    max_merge_invocations: int = pydantic.Field(5, ge=0, le=100)
    failure_score: float = 0.0
    perfect_score: float = 1.0
    fanout: bool = pydantic.Field(
        True, description="score candidates on the valset as chunks on every optimize worker, not only in the compile "
                          "stage's threads (chunks of the run's eval_chunk_size)")
    fanout_wait_s: float = pydantic.Field(
        10.0, ge=0, le=600, description="a chunk no worker has started within this is run in the compile stage")

    @pydantic.field_validator("max_full_evals", "max_metric_calls")
    @classmethod
    def _one_budget(cls, value: int | None, info: pydantic.ValidationInfo) -> int | None:
        given = [name for name in _BUDGETS[:_BUDGETS.index(str(info.field_name))] if info.data.get(name) is not None]
        if value is not None and given:
            raise ValueError(f"give one budget: {info.field_name} or {' or '.join(given)}, not both")
        return value

    @pydantic.field_validator("perfect_score")
    @classmethod
    def _above_failure(cls, value: float, info: pydantic.ValidationInfo) -> float:
        failure = info.data.get("failure_score")
        if failure is not None and value <= failure:
            raise ValueError(f"must be above failure_score ({failure:g})")
        return value

    def budget(self) -> dict[str, Any]:
        """dspy.GEPA's budget keyword: the one given, else ``auto="light"``."""
        for name in _BUDGETS:
            if getattr(self, name) is not None:
                return {name: getattr(self, name)}
        return {"auto": "light"}


# -- GEPA's state as JSON ---------------------------------------------------------------------------------
_TAGS = ("$tuple", "$set", "$dict", "$float")
#: Attributes holding program outputs (dspy objects): kept only when they encode (both off here).
_OPTIONAL: dict[str, Any] = {"best_outputs_valset": None, "evaluation_cache": None}


def encode(value: Any) -> Any:
    """A JSON value that :func:`decode` turns back into ``value`` exactly (tuples, sets, non-string
    dict keys and non-finite floats tagged).

    Raises:
        TypeError: ``value`` holds something else (a program output, an object).
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [encode(v) for v in value]}
    if isinstance(value, set | frozenset):
        return {"$set": sorted((encode(v) for v in value), key=repr)}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v) for k, v in value.items()}
        return {"$dict": [[encode(k), encode(v)] for k, v in value.items()]}
    raise TypeError(f"cannot keep a {type(value).__name__} in GEPA's JSON state")


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        tag, inner = next(iter(value.items()))
        if tag == "$tuple":
            return tuple(decode(v) for v in inner)
        if tag == "$set":
            return {decode(v) for v in inner}
        if tag == "$float":
            return float(inner)
        return {decode(k): decode(v) for k, v in inner}
    return {k: decode(v) for k, v in value.items()}


def state_to_json(state: Any) -> dict[str, Any]:
    """``GEPAState.__dict__`` as JSON, without its runtime-only attributes (budget hooks)."""
    from gepa.core.state import GEPAState

    out: dict[str, Any] = {}
    for name, value in state.__dict__.items():
        if name in GEPAState._EXCLUDED_FROM_SERIALIZATION:
            continue
        try:
            out[name] = encode(value)
        except TypeError:
            if name not in _OPTIONAL:
                raise
            out[name] = _OPTIONAL[name]
    out["validation_schema_version"] = GEPAState._VALIDATION_SCHEMA_VERSION
    return out


def state_from_json(data: dict[str, Any]) -> Any:
    """A ``GEPAState`` from :func:`state_to_json` output, upgraded and checked as ``GEPAState.load`` does.

    Raises:
        ValueError: the data is not a consistent GEPA state.
    """
    from gepa.core.state import GEPAState

    d = {name: decode(value) for name, value in data.items()}
    version = d.get("validation_schema_version")
    try:
        if version is None or version < 2:
            GEPAState._migrate_from_legacy_state_v0(d)
        if d.get("validation_schema_version", 0) < GEPAState._VALIDATION_SCHEMA_VERSION:
            GEPAState._upgrade_state_dict(d)
        defaults: dict[str, Any] = {**_OPTIONAL, "full_program_trace": []}
        for name, default in defaults.items():
            d.setdefault(name, default)
        state = GEPAState.__new__(GEPAState)
        state.__dict__.update(d)
        state.validation_schema_version = GEPAState._VALIDATION_SCHEMA_VERSION
        state.is_consistent()
        assert isinstance(state.adapter_state, dict) and isinstance(state.i, int)
        assert isinstance(state.total_num_evals, int) and isinstance(state.num_full_ds_evals, int)
    except (AssertionError, AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a consistent GEPA state: {type(exc).__name__} {exc}") from None
    return state


# -- resume ----------------------------------------------------------------------------------------------
_RESTORE: contextvars.ContextVar[Any] = contextvars.ContextVar("dspex_gepa_restore", default=None)
_install_lock = threading.Lock()


def install_resume_hook() -> None:
    """Wrap ``gepa.core.engine.initialize_gepa_state`` (once per process): while a compile of this module
    holds a restored state, the engine gets it instead of a fresh one; otherwise GEPA's own runs."""
    engine: Any = importlib.import_module("gepa.core.engine")  # the name its run() calls, not re-exported

    with _install_lock:
        if getattr(engine.initialize_gepa_state, "_dspex_resume", False):
            return
        original = engine.initialize_gepa_state

        def initialize_gepa_state(*args: Any, **kwargs: Any) -> Any:
            state = _RESTORE.get()
            if state is None:
                return original(*args, **kwargs)
            _RESTORE.set(None)  # one engine run per restore
            if kwargs.get("frontier_type", "instance") != state.frontier_type:
                raise ValueError(f"restored GEPA state tracks a '{state.frontier_type}' frontier")
            cache = kwargs.get("evaluation_cache")  # as GEPA syncs a loaded state with this run's setting
            state.evaluation_cache = None if cache is None else state.evaluation_cache or cache
            return state

        initialize_gepa_state._dspex_resume = True  # type: ignore[attr-defined]
        engine.initialize_gepa_state = initialize_gepa_state


def _restorable(saved: dict[str, Any] | None, seed: dict[str, str], n_val: int) -> Any:
    """The saved state, if it is one of this run's (same seed instructions and valset), else None."""
    if not saved or saved.get("format") != STATE_FORMAT or not isinstance(saved.get("state"), dict):
        return None
    try:
        state = state_from_json(saved["state"])
    except ValueError as exc:
        log.warning("GEPA checkpoint ignored: %s", exc)
        return None
    if (not state.program_candidates or state.program_candidates[0] != seed
            or state.list_of_named_predictors != list(seed)
            or set(state.pareto_front_valset) - set(range(n_val))):
        log.warning("GEPA checkpoint ignored: it is not of this program and valset")
        return None
    return state


def _seed_policy(resuming: bool) -> Any:
    from gepa.strategies.eval_policy import FullEvaluationPolicy

    class SeedPolicy(FullEvaluationPolicy[Any, Any]):
        """GEPA's full evaluation; when resuming, the seed (whose scores the state has) on one example only."""

        def get_seed_eval_batch(self, loader: Any) -> list[Any]:
            ids = list(loader.all_ids())
            return ids[:1] if resuming else ids

    return SeedPolicy()


# -- metric and events -----------------------------------------------------------------------------------
def feedback_metric(metric: Any) -> Any:
    """A registered metric in GEPA's five-argument form, returning ``dspy.Prediction(score, feedback)``."""
    import dspy

    from ..metrics import metric_feedback, metric_score

    def gepa_metric(gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None) -> Any:
        value = metric(gold, pred, trace)
        score = metric_score(value)
        return dspy.Prediction(score=score, feedback=metric_feedback(value) or _generic_feedback(gold, score))

    return gepa_metric


def _generic_feedback(gold: Any, score: float) -> str:
    labels = gold.labels() if hasattr(gold, "labels") else {}
    expected = "; ".join(f"{k}: {str(v)[:200]!r}" for k, v in labels.items())
    return f"This output scored {score:.3f}." + (f" Expected {expected}." if expected else "")


class _Reporter:
    """GEPA callbacks: an event per scored candidate, the state saved after each iteration, the trials."""

    def __init__(self, ctx: CompileContext | None, budget: Any) -> None:
        self.ctx = ctx
        self.budget = budget  # dspy.GEPA: max_metric_calls is known once its compile starts
        self.calls = 0
        self.trials: list[float] = []
        self.proposed = 0
        self.failed: list[BaseException] = []
        self._lock = threading.Lock()

    def reflected(self, error: BaseException | None) -> None:
        """One reflection (a proposal of new instructions) done, or failed with ``error``."""
        with self._lock:
            if error is None:
                self.proposed += 1
                return
            self.failed.append(error)
        if self.ctx is not None:
            self.ctx.emit(message=f"reflection failed ({type(error).__name__}): {str(error)[:300]}")

    def hopeless(self, state: Any) -> bool:
        """A GEPA stopper: the first reflections all failed, so the rest would too (the run then fails)."""
        return len(self.failed) >= FAILED_REFLECTIONS_TO_STOP and not self.proposed

    def on_budget_updated(self, event: Any) -> None:
        self.calls = int(event["metric_calls_used"])

    def on_valset_evaluated(self, event: Any) -> None:
        if self.ctx is None:
            return
        idx, score = int(event["candidate_idx"]), float(event["average_score"])
        parents = [p for p in event["parent_ids"] if p is not None]
        calls = self.calls or int(event["num_examples_evaluated"])
        what = "seed program" if idx == 0 else f"candidate {idx} (from {', '.join(map(str, parents))})"
        best = ", best so far" if event["is_best_program"] else ""
        self.ctx.emit(message=f"iteration {event['iteration']}: {what} scored {score:.4f} on the valset{best}; "
                              f"{calls}/{self.budget.max_metric_calls} metric calls",
                      score=score, candidate=idx, iteration=int(event["iteration"]), metric_calls=calls)

    def on_iteration_end(self, event: Any) -> None:
        if self.ctx is None:
            return
        state = event["state"]
        self.ctx.save(STATE_CHECKPOINT, {"format": STATE_FORMAT, "iteration": int(event["iteration"]),
                                         "total_num_evals": state.total_num_evals,
                                         "max_metric_calls": self.budget.max_metric_calls,
                                         "state": state_to_json(state)})

    def on_optimization_end(self, event: Any) -> None:
        self.trials = [float(s) for s in event["final_state"].program_full_scores_val_set]


def _watched_proposer(reporter: _Reporter) -> Any:
    """dspy's instruction proposer, reporting each reflection: GEPA logs a failed one and goes on, so a
    reflection LM that always fails (a wrong model or key) would otherwise spend the budget unnoticed."""
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    class WatchedProposer(InstructionProposer):  # type: ignore[misc]
        def __call__(self, candidate: dict[str, str], reflective_dataset: Any,
                     components_to_update: list[str]) -> dict[str, str]:
            try:
                proposed: dict[str, str] = super().__call__(candidate, reflective_dataset, components_to_update)
            except Exception as exc:
                reporter.reflected(exc)
                raise
            reporter.reflected(None)
            return proposed

    return WatchedProposer()


def _all_reflections_failed(failed: list[BaseException]) -> DspexError:
    first = failed[0]
    if isinstance(first, DspexError):
        first.args = (f"every reflection of the GEPA run failed ({len(failed)}); the first: {first}", *first.args[1:])
        return first
    return DspexError(f"every reflection of the GEPA run failed ({len(failed)}); the first: "
                      f"{type(first).__name__}: {str(first)[:500]}")


# -- valset evaluations on every optimize worker ---------------------------------------------------------
_FANOUT: contextvars.ContextVar[Any] = contextvars.ContextVar("dspex_gepa_fanout", default=None)
FANOUT_KIND = "gepa_eval"


class _Fanout:
    """How this compile's valset evaluations fan out: the valset's examples by identity, the chunk size."""

    def __init__(self, ctx: CompileContext, valset: list[Any], chunk: int, failure_score: float, wait_s: float) -> None:
        self.ctx, self.chunk, self.failure_score, self.wait_s = ctx, chunk, failure_score, wait_s
        self.index = {id(example): i for i, example in enumerate(valset)}

    def rows(self, batch: list[Any]) -> list[int] | None:
        found = [self.index.get(id(example)) for example in batch]
        return None if None in found or len(found) <= self.chunk else [i for i in found if i is not None]

    def evaluate(self, adapter: Any, original: Any, batch: list[Any], rows: list[int], candidate: dict[str, str],
                 num_threads: int | None) -> Any:
        parts = [rows[i:i + self.chunk] for i in range(0, len(rows), self.chunk)]
        where = {row: pos for pos, row in enumerate(rows)}

        def local(i: int) -> list[float]:
            sub = [batch[where[row]] for row in parts[i]]
            return [float(x) for x in original(adapter, sub, candidate, capture_traces=False,
                                                num_threads=num_threads).scores]

        payloads = [{"candidate": candidate, "rows": part, "failure_score": self.failure_score} for part in parts]
        results = self.ctx.fan_out(FANOUT_KIND, payloads, local, wait_s=self.wait_s)
        if results is None:
            return original(adapter, batch, candidate, capture_traces=False, num_threads=num_threads)
        scores = [float(x) for part in results for x in part]
        return adapter._make_evaluation_batch(outputs=[None] * len(batch), raw_scores=scores, trajectories=None)


def install_fanout_hook() -> None:
    """Wrap dspy's ``DspyAdapter.evaluate`` (once per process): while a compile of this module fans out, a
    valset evaluation without traces (scoring a candidate) of more than one chunk runs as compile chunks on every
    optimize worker; everything else (minibatch rollouts with traces, reflections) runs as dspy runs it.
    ``dspy.GEPA`` takes no adapter or evaluator of ours, so this is the one place its rollouts can be handed on."""
    from dspy.teleprompt.gepa import gepa_utils

    with _install_lock:
        original = gepa_utils.DspyAdapter.evaluate
        if getattr(original, "_dspex_fanout", False):
            return

        def evaluate(self: Any, batch: list[Any], candidate: dict[str, str], capture_traces: bool = False,
                     num_threads: int | None = None) -> Any:
            fan = _FANOUT.get()
            rows = fan.rows(batch) if fan is not None and not capture_traces else None
            if rows is None:
                return original(self, batch, candidate, capture_traces=capture_traces, num_threads=num_threads)
            return fan.evaluate(self, original, batch, rows, candidate, num_threads)

        evaluate._dspex_fanout = True  # type: ignore[attr-defined]
        gepa_utils.DspyAdapter.evaluate = evaluate


def evaluate_chunk(stages: Any, run_id: str, rec: Any, payload: dict[str, Any]) -> list[float]:
    """A ``gepa_eval`` compile chunk on the worker that took it: the run's baseline program with the candidate's
    instructions, scored on its valset rows (billed and counted as the run's evaluations are)."""
    from ...programs.state import load_program
    from ..metrics import get_metric
    from . import parse_common

    sig = stages._sig(rec)
    module = load_program(sig, (stages.runs.checkpoint(run_id, "baseline_state") or {}).get("state"))
    candidate = payload.get("candidate") or {}
    for name, predictor in module.named_predictors():
        if isinstance(candidate.get(name), str):
            predictor.signature = predictor.signature.with_instructions(candidate[name])
    val = stages.runs.checkpoint(run_id, "data")["val"]
    rows = [val[int(i)] for i in payload.get("rows") or []]
    common = parse_common(rec.params)
    scores, calls, refused, spent = stages._evaluate(sig, rec.session or None, module, rows, get_metric(rec.metric),
                                                     common.num_threads)
    stages._spent(run_id, sig, calls, spent)
    failure = float(payload.get("failure_score") or 0.0)
    return [failure if refused and s == 0.0 else s for s in scores]


# -- the optimizer ---------------------------------------------------------------------------------------
def compile(student: Any, trainset: list[Any], valset: list[Any], metric: Any, params: Params, common: Any, *,
            ctx: CompileContext | None = None) -> tuple[Any, list[float]]:
    import dspy

    install_resume_hook()
    if ctx is not None:
        reflection = ctx.lm(params.reflection_lm)
    else:
        reflection = dspy.LM(params.reflection_lm) if params.reflection_lm else dspy.settings.lm
    seed = {name: pred.signature.instructions for name, pred in student.named_predictors()}
    restored = _restorable(ctx.load(STATE_CHECKPOINT) if ctx else None, seed, len(valset or trainset))
    reporter = _Reporter(ctx, None)
    tp = dspy.GEPA(
        metric=feedback_metric(metric), **params.budget(), reflection_lm=reflection,
        reflection_minibatch_size=params.reflection_minibatch_size,
        candidate_selection_strategy=params.candidate_selection_strategy,
        component_selector=params.component_selector, skip_perfect_score=params.skip_perfect_score,
        add_format_failure_as_feedback=params.add_format_failure_as_feedback, use_merge=params.use_merge,
        max_merge_invocations=params.max_merge_invocations, failure_score=params.failure_score,
        perfect_score=params.perfect_score, num_threads=common.num_threads, seed=common.seed,
        warn_on_score_mismatch=False, instruction_proposer=_watched_proposer(reporter),
        gepa_kwargs={"callbacks": [reporter], "stop_callbacks": [reporter.hopeless],
                     "val_evaluation_policy": _seed_policy(restored is not None)})
    reporter.budget = tp
    reporter.calls = restored.total_num_evals if restored is not None else 0
    if restored is not None and ctx is not None:
        ctx.emit(message=f"resuming GEPA after iteration {restored.i + 1}: {len(restored.program_candidates)} "
                         f"candidates, {restored.total_num_evals} metric calls used",
                 resumed_iteration=restored.i + 1, metric_calls=restored.total_num_evals)
    token = _RESTORE.set(restored)
    fan = None
    if ctx is not None and params.fanout and valset:
        install_fanout_hook()
        fan = _Fanout(ctx, valset, common.eval_chunk_size, params.failure_score, params.fanout_wait_s)
    fan_token = _FANOUT.set(fan)
    try:
        compiled = tp.compile(student, trainset=trainset, valset=valset or None)
    finally:
        _FANOUT.reset(fan_token)
        _RESTORE.reset(token)
    if reporter.failed and not reporter.proposed:
        raise _all_reflections_failed(reporter.failed)
    return compiled, reporter.trials


def estimate(n_train: int, n_val: int, params: Params) -> int:
    """Metric calls (each one program run) plus about one reflection call per two minibatches."""
    budget = params.budget()
    if "max_metric_calls" in budget:
        calls = int(budget["max_metric_calls"])
    elif "max_full_evals" in budget:
        calls = int(budget["max_full_evals"]) * (n_train + n_val)
    else:
        import dspy
        from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS

        # dspy's own formula (a method that reads no instance state), for a one-predictor program
        calls = int(dspy.GEPA.auto_budget(None, num_preds=1, num_candidates=AUTO_RUN_SETTINGS[budget["auto"]]["n"],
                                          valset_size=n_val or n_train))
    return calls + calls // (2 * params.reflection_minibatch_size)


register_chunk_handler(FANOUT_KIND, evaluate_chunk)
register(Optimizer("gepa", Params, compile, estimate, "reflective instruction evolution (GEPA) from metric feedback",
                   feedback=True))
