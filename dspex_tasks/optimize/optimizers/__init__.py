"""Optimizers by name. Adding one (COPRO, ...) is one module that calls :func:`register`.

An optimizer turns (student module, trainset, valset, metric, params) into a
compiled module. Its params are a pydantic model, so bad params fail before
anything runs, naming the field. A key neither the model nor :class:`CommonParams`
knows is refused (with a did-you-mean) unless the model sets ``extra="allow"``.
Workers publish :func:`params_schemas` so clients check params before enqueueing.

A compile function that declares a keyword ``ctx`` gets a :class:`CompileContext`:
events for the run, checkpoints that survive its worker (a redelivered compile stage
can resume), and the LM to reflect with.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic

from ... import keys
from ...errors import ValidationError
from ..params import unknown_param_message

__all__ = ["Optimizer", "register", "get_optimizer", "builtin_optimizer", "optimizer_names", "params_schemas", "CommonParams",
           "CompileContext", "accepts_ctx", "reflection_lm", "CHUNK_HANDLERS", "register_chunk_handler",
           "chunk_handler"]


class CommonParams(pydantic.BaseModel):
    """Params every run accepts, whatever the optimizer.

    ``extra="allow"``: a run's params mix these with the optimizer's own, which
    :meth:`Optimizer.parse_params` checks (unknown keys included).
    """

    model_config = pydantic.ConfigDict(extra="allow")
    min_gain: float = pydantic.Field(1e-9, description="promote only if candidate - baseline >= this")
    val_fraction: float = pydantic.Field(0.3, gt=0, lt=1, description="held out from the trainset without a valset")
    eval_chunk_size: int = pydantic.Field(16, ge=1, le=1000)
    seed: int = 0
    num_threads: int = pydantic.Field(8, ge=1, le=64)
    max_cost_usd: float | None = pydantic.Field(
        None, gt=0, description="stop at the next stage boundary once the run's LM spend reaches this (USD)")
    max_lm_calls: int | None = pydantic.Field(
        None, ge=1, description="stop at the next stage boundary once the run made this many LM calls")
    confidence: float | None = pydantic.Field(
        None, gt=0.5, lt=1, description="also require the gain's paired bootstrap interval at this level (e.g. "
        "0.95) to lie above min_gain; unset, the 95% interval is reported but not required")
    bootstrap_resamples: int = pydantic.Field(2000, ge=100, le=100_000,
                                              description="resamples of the gain's bootstrap interval")


@dataclass(frozen=True)
class Optimizer:
    """A registered optimizer.

    ``compile(student, trainset, valset, metric, params, common[, *, ctx])`` returns the compiled module and a
    list of trial scores (may be empty); ``ctx`` (a :class:`CompileContext`) is passed only to a compile
    function that declares it. ``estimate(n_train, n_val, params)`` guesses LM calls for progress.
    ``feedback``: the compile function gets the metric as registered (its ``{"score", "feedback"}`` results
    kept); otherwise it gets a metric returning the score only (``metrics.scoring``).
    """

    name: str
    params: type[pydantic.BaseModel]
    compile: Callable[..., tuple[Any, list[float]]]
    estimate: Callable[[int, int, Any], int]
    description: str = ""
    feedback: bool = False

    def _names(self) -> set[str]:
        names = set()
        for name, f in self.params.model_fields.items():
            names.add(name)
            names.update(a for a in (f.alias, f.validation_alias) if isinstance(a, str))
        return names

    def parse_params(self, raw: dict[str, Any] | None) -> Any:
        """The optimizer's own params from a run's params (common keys skipped, unknown keys refused)."""
        common = set(CommonParams.model_fields)
        own = {k: v for k, v in (raw or {}).items() if k not in common}
        errors: list[dict[str, str]] = []
        if self.params.model_config.get("extra") != "allow":
            names = self._names()
            errors = [{"field": f"params.{k}", "message": unknown_param_message(k, names | common, self.name)}
                      for k in own if k not in names]
            own = {k: v for k, v in own.items() if k in names}
        try:
            parsed = self.params.model_validate(own)
        except pydantic.ValidationError as exc:
            errors += [{"field": "params." + ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                       for e in exc.errors(include_url=False)]
        if errors:
            raise ValidationError.from_errors(f"params for optimizer '{self.name}'", errors)
        return parsed

    def params_schema(self) -> dict[str, Any]:
        """JSON Schema of everything a run of this optimizer accepts in ``params`` (own and common keys)."""
        own = self.params.model_json_schema()
        common = CommonParams.model_json_schema()
        props = {**(own.get("properties") or {}), **(common.get("properties") or {})}
        schema: dict[str, Any] = {"type": "object", "title": f"{self.name} params", "properties": props,
                                  "additionalProperties": self.params.model_config.get("extra") == "allow"}
        required = [r for r in own.get("required") or [] if r not in CommonParams.model_fields]
        if required:
            schema["required"] = required
        defs = {**(own.get("$defs") or {}), **(common.get("$defs") or {})}
        if defs:
            schema["$defs"] = defs
        # rules across the optimizer's own fields (e.g. gepa's one budget) apply to the whole params object
        schema.update({k: own[k] for k in ("allOf", "dependentSchemas", "dependentRequired") if k in own})
        return schema


_REGISTRY: dict[str, Optimizer] = {}
_BUILTIN = ("bootstrap", "random_search", "miprov2", "gepa")


def register(opt: Optimizer) -> Optimizer:
    _REGISTRY[opt.name] = opt
    return opt


def _load_builtins() -> None:
    for mod in _BUILTIN:
        importlib.import_module(f"{__name__}.{mod}")


def get_optimizer(name: str) -> Optimizer:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValidationError.from_errors("optimization", [{
            "field": "optimizer", "message": f"unknown optimizer '{name}'; known: {', '.join(optimizer_names())}"}]
        ) from None


def builtin_optimizer(name: str) -> Optimizer | None:
    """The built-in optimizer ``name`` (their modules import pydantic only, so clients may load them)."""
    _load_builtins()
    opt = _REGISTRY.get(name)
    return opt if opt is not None and opt.compile.__module__.rsplit(".", 1)[-1] in _BUILTIN else None


def optimizer_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def params_schemas() -> dict[str, dict[str, Any]]:
    """Each registered optimizer's :meth:`Optimizer.params_schema`, by name (what workers publish)."""
    _load_builtins()
    return {name: _REGISTRY[name].params_schema() for name in sorted(_REGISTRY)}


def as_fractions(scores: list[float]) -> list[float]:
    """DSPy's own evaluations report percentages; ours report fractions. One scale for trials."""
    return [s / 100.0 for s in scores] if any(s > 1.0 for s in scores) else scores


def parse_common(raw: dict[str, Any] | None) -> CommonParams:
    try:
        return CommonParams.model_validate(raw or {})
    except pydantic.ValidationError as exc:
        errors = [{"field": "params." + ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                  for e in exc.errors(include_url=False)]
        raise ValidationError.from_errors("optimization params", errors) from None


# -- the compile stage's context ----------------------------------------------------------------------------------
#: Optimizer checkpoints live beside the stages' own, under this prefix (``keys.run_checkpoint``).
CHECKPOINT_PREFIX = "compile:"


@dataclass(frozen=True)
class CompileContext:
    """What a run's compile stage offers its optimizer (passed as keyword ``ctx``).

    Checkpoints are JSON objects kept with the run (same retention as its record); unlike a stage's
    output, :meth:`save` overwrites, so an optimizer can keep its latest state under one name and a
    redelivered compile stage (its worker killed) can :meth:`load` it and resume.

    Example:
        >>> def compile(student, trainset, valset, metric, params, common, *, ctx=None):  # doctest: +SKIP
        ...     state = ctx.load("state") if ctx else None
        ...     ctx.emit(message="candidate 1 scored 0.8", score=0.8)
        ...     ctx.save("state", {"round": 1})
    """

    run_id: str
    emit_fn: Callable[..., None]
    load_fn: Callable[[str], Any]
    save_fn: Callable[[str, dict[str, Any]], None]
    lm_fn: Callable[[str | None], Any] = lambda model: None
    fan_out_fn: Callable[..., list[Any]] | None = None

    @classmethod
    def for_run(cls, runs: Any, run_id: str, *, emit: Callable[..., None],
                lm: Callable[[str | None], Any] | None = None,
                fan_out: Callable[..., list[Any]] | None = None) -> CompileContext:
        """A context on a :class:`~dspex_tasks.optimize.runs.RunStore`'s checkpoints of ``run_id``."""

        def save(name: str, data: dict[str, Any]) -> None:
            runs.redis.set(keys.run_checkpoint(runs.ns, run_id, CHECKPOINT_PREFIX + name), json.dumps(data),
                           ex=runs.retention_s)

        def load(name: str) -> Any:
            return runs.checkpoint(run_id, CHECKPOINT_PREFIX + name)

        return cls(run_id, emit, load, save, lm or (lambda model: None), fan_out)

    def emit(self, *, message: str | None = None, score: float | None = None, done: int | None = None,
             total: int | None = None, **fields: Any) -> None:
        """A ``compile`` event of the run (``done``/``total`` default to the stage's LM-call progress)."""
        given = {"message": message, "score": score, "done": done, "total": total}
        self.emit_fn(**{k: v for k, v in given.items() if v is not None}, **fields)

    def load(self, name: str) -> dict[str, Any] | None:
        """The checkpoint saved under ``name`` by this run's compile stage (any attempt), or None."""
        data = self.load_fn(name)
        return data if isinstance(data, dict) else None

    def save(self, name: str, data: dict[str, Any]) -> None:
        """Keep ``data`` (JSON) under ``name``, replacing what was there."""
        self.save_fn(name, data)

    def fan_out(self, kind: str, payloads: list[dict[str, Any]], local: Callable[[int], Any], *,
                wait_s: float) -> list[Any] | None:
        """Run ``payloads`` as ``dspex.optimize.compile_chunk`` tasks of ``kind`` on any optimize worker and return
        their results in order, or None when this context cannot fan out (then the caller does the work itself).

        Work stealing, so a stage that waits never deadlocks a busy fleet: a chunk nobody has started within
        ``wait_s`` is claimed and run here with ``local(index)``; each chunk runs once (a claim key), its result
        is a JSON checkpoint of the run. ``kind`` names a handler registered with :func:`register_chunk_handler`.
        """
        if self.fan_out_fn is None:
            return None
        return self.fan_out_fn(kind, payloads, local, wait_s)

    def lm(self, model: str | None = None) -> Any:
        """The LM an optimizer reflects or proposes with: ``model``, else ``DSPEX_REFLECTION_LM``, else the
        task's LM (``dspy.settings.lm``, as the compile stage set it). A named one goes through the worker's
        governed LM (usage, rate limits, cache) and, with the mock LM configured, is that mock."""
        chosen = self.lm_fn(model)
        if chosen is not None:
            return chosen
        import dspy

        return dspy.settings.lm


#: What a ``dspex.optimize.compile_chunk`` task of each kind runs: ``handler(stages, run_id, record, payload)`` on
#: the worker that took the chunk, returning its JSON result.
CHUNK_HANDLERS: dict[str, Callable[..., Any]] = {}


def register_chunk_handler(kind: str, handler: Callable[..., Any]) -> None:
    CHUNK_HANDLERS[kind] = handler


def chunk_handler(kind: str) -> Callable[..., Any]:
    _load_builtins()
    try:
        return CHUNK_HANDLERS[kind]
    except KeyError:
        raise ValidationError.from_errors("compile chunk", [{
            "field": "kind", "message": f"unknown compile chunk kind '{kind}'; known: {', '.join(sorted(CHUNK_HANDLERS))}"}]
        ) from None


def accepts_ctx(fn: Callable[..., Any]) -> bool:
    """Whether a compile function takes the keyword ``ctx`` (by name or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any((p.name == "ctx" and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD for p in params)


def allowed_reflection_models(settings: Any) -> set[str]:
    """What ``params["reflection_lm"]`` may name: the fleet's configured models (``DSPEX_LM``,
    ``DSPEX_REFLECTION_LM``, ``DSPEX_LM_FALLBACKS``)."""
    models = {settings.lm, *(m.strip() for m in (settings.lm_fallbacks or "").split(",") if m.strip())}
    if settings.reflection_lm:
        models.add(settings.reflection_lm)
    return models


def reflection_lm(settings: Any, redis: Any, signature: str, model: str | None) -> Any:
    """The governed LM for ``model`` (default ``DSPEX_REFLECTION_LM``), or None for "the task's LM".

    Built as the worker builds a signature's LM (``lm.governed``): recorded in the usage scope, under the
    model's rate limits and the shared cache when configured. With ``DSPEX_LM=mock`` every model is that
    mock; with ``DSPEX_LM_API_BASE`` a named model goes to that same endpoint (``lm.factory.build_lm``).
    """
    if model and model not in allowed_reflection_models(settings):
        # a run's params come from any client: it may pick among the models this fleet is configured for, never
        # make the worker spend its keys on a model of the client's choosing
        raise ValidationError.from_errors("params for optimizer 'gepa'", [{
            "field": "params.reflection_lm",
            "message": f"'{model}' is not a model this worker is configured for; use one of "
                       f"{', '.join(sorted(allowed_reflection_models(settings)))} (or set DSPEX_REFLECTION_LM)"}])
    model = model or settings.reflection_lm
    if not model:
        return None
    from ...lm.governed import build_signature_lm, plan_lm

    if settings.lm == "mock":
        model = "mock"
    plan = plan_lm(settings, f"{signature}.reflection", {"lm": model})
    if not plan.governed:  # the in-process mock: governed too, so its calls are recorded (as Runtime.lm_for does)
        plan = dataclasses.replace(plan, governed=True, key=f"governed:{plan.route.key}")
    return build_signature_lm(settings, plan, redis)
