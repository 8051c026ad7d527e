"""The wire format, defined once: task names, queues, headers, and the kwargs and result shapes.

Everything a sender and a worker must agree on lives here, so that a producer in another service
(``celery_app.send_task("dspex.qa", kwargs=...)``), the Python client, the gateway, the workers and the
metrics all read the same definitions.

- A program's task is ``dspex.<name>`` (:func:`task_name`; :func:`program_of` parses it back).
- ``dspex.map`` runs many inputs of one program in one message; ``dspex.optimize.*`` are the stages of an
  optimization run. Program names that would collide with them are reserved (:func:`check_program_name`).
- Kwargs are JSON objects (:class:`PredictKwargs`, :class:`MapKwargs`); results are JSON objects
  (:class:`PredictResult`, :class:`MapResult`). Nothing else is accepted, and nothing is pickled.
- Per-request options (:class:`Options`: ``trace``, ``lm_config``) travel as ``kwargs["options"]``, only
  when one is set; :func:`check_options` is the one check the client, the gateway and the worker apply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NotRequired, TypedDict

from .errors import SignatureError, ValidationError

__all__ = [
    "PREFIX", "MAP_TASK", "OPTIMIZE_PREFIX", "STAGE_TASK", "EVAL_CHUNK_TASK", "EVAL_MERGE_TASK", "FAIL_TASK", "COMPILE_CHUNK_TASK",
    "SCHEDULED_TASK", "PREDICT_QUEUE", "OPTIMIZE_QUEUE", "CELERY_DEFAULT_QUEUE", "DEFAULT_REDIS_URL", "SENT_AT_HEADER", "REQUEUE_HEADER", "SLOT_HEADER",
    "RESERVED_NAMES", "PredictKwargs", "MapKwargs", "PredictResult", "MapResult", "ItemError", "Options",
    "TraceEntry", "LM_CONFIG_KEYS", "OPTION_NAMES", "MAX_JSON_DEPTH", "check_json", "json_numbers", "task_name", "program_of", "check_program_name",
    "predict_kwargs", "map_kwargs", "sent_headers", "header", "check_task_args", "check_options", "request_options",
    "lm_config_schema", "task_routes", "item_error",
]

PREFIX = "dspex."
MAP_TASK = "dspex.map"
OPTIMIZE_PREFIX = "dspex.optimize."
STAGE_TASK = "dspex.optimize.stage"
EVAL_CHUNK_TASK = "dspex.optimize.eval_chunk"
EVAL_MERGE_TASK = "dspex.optimize.eval_merge"
FAIL_TASK = "dspex.optimize.fail"
#: A piece of an optimizer's own work fanned out from its compile stage (GEPA's valset evaluations).
COMPILE_CHUNK_TASK = "dspex.optimize.compile_chunk"
SCHEDULED_TASK = "dspex.optimize.scheduled"

#: Where clients and workers look for Redis when ``DSPEX_REDIS_URL`` is not set.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: Default queue names (``DSPEX_PREDICT_QUEUE``, ``DSPEX_OPTIMIZE_QUEUE`` override them).
PREDICT_QUEUE = "dspex.predict"
OPTIMIZE_QUEUE = "dspex.optimize"
#: Celery's own default queue: where a Celery client with no dspex configuration sends
#: (``send_task("dspex.qa", ...)`` without ``queue=``). Default workers consume it too.
CELERY_DEFAULT_QUEUE = "celery"

#: When the producer sent the message (unix seconds): ``dspex health`` reads queue age from it.
SENT_AT_HEADER = "dspex_sent_at"
#: How many times a task was re-queued for a full rate-limit bucket (its own budget).
REQUEUE_HEADER = "dspex_rate_limited"
#: The rate-limit slot a re-queued task comes back to redeem.
SLOT_HEADER = "dspex_rl_slot"

#: Program names whose task would be one of the wire's own (``map`` -> ``dspex.map``; ``optimize`` and
#: ``optimize.*`` -> the optimization stages, and the ``dspex.optimize.*`` route).
RESERVED_NAMES = frozenset({"map", "optimize"})
_RESERVED_PREFIX = "optimize."


class Options(TypedDict, total=False):
    """Per-request options (ARCHITECTURE 3.6), as :func:`check_options` returns them: only the ones set.

    ``trace``: the result carries ``"trace"`` (:class:`TraceEntry` per predictor call). ``lm_config``:
    LM settings for every LM call of the job, from :data:`LM_CONFIG_KEYS` only. ``stream``: the job publishes
    its live events (:mod:`dspex_tasks.live`). ``timeout_s``: the job's total time from its submission; past
    it the job stops before its next LM call and ends as ``errors.Cancelled``.
    """

    trace: bool
    lm_config: dict[str, Any]
    stream: bool
    timeout_s: float


class PredictKwargs(TypedDict):
    """Kwargs of ``dspex.<name>`` (ARCHITECTURE 3.2); ``options`` only when one is set."""

    inputs: dict[str, Any]
    session: str | None
    program: str | None
    options: NotRequired[Options]


class MapKwargs(TypedDict):
    """Kwargs of ``dspex.map``: many inputs of one program (the options apply to every item)."""

    signature: str
    items: list[dict[str, Any]]
    session: str | None
    program: str | None
    options: NotRequired[Options]


class TraceEntry(TypedDict):
    """One predictor call of a traced job: the predictor's ``named_predictors()`` name, its inputs and outputs."""

    predictor: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]


class PredictResult(TypedDict):
    """The result of ``dspex.<name>`` (ARCHITECTURE section 2)."""

    outputs: dict[str, Any]
    session: str | None
    program: str
    program_version: int
    usage: dict[str, Any]
    lm: str
    duration_ms: float
    worker: str
    task_id: NotRequired[str | None]
    trace: NotRequired[list[TraceEntry]]


class ItemError(TypedDict):
    """A failed item of ``dspex.map``: the error's class name and its positional args."""

    type: str
    args: list[Any]


class MapResult(TypedDict):
    """The result of ``dspex.map``: per item a :class:`PredictResult` or ``{"error": ItemError}``."""

    results: list[dict[str, Any]]


def item_error(exc: BaseException) -> ItemError:
    """A failed ``dspex.map`` item: the class name and positional args (rebuilt by ``errors.from_remote``)."""
    return {"type": type(exc).__name__, "args": list(exc.args)}


def task_name(name: str) -> str:
    """The task serving program ``name``."""
    return PREFIX + name


def program_of(task: str) -> str | None:
    """The program a task name serves; None for ``dspex.map``, the optimization stages and foreign tasks."""
    if not task.startswith(PREFIX) or task == MAP_TASK or task.startswith(OPTIMIZE_PREFIX):
        return None
    return task[len(PREFIX):] or None


def check_program_name(name: str) -> str:
    """Refuse a program name whose task the wire uses itself.

    Raises:
        SignatureError: naming the reserved name.
    """
    if name in RESERVED_NAMES or name.startswith(_RESERVED_PREFIX):
        taken = MAP_TASK if name == "map" else OPTIMIZE_PREFIX + "*"
        raise SignatureError(f"signature name '{name}' is reserved: its task would collide with {taken}")
    return name


def predict_kwargs(inputs: dict[str, Any], session: str | None, program: str | None,
                   options: Options | None = None) -> PredictKwargs:
    """The kwargs of one prediction; ``options`` only when one is set (older workers never see the key)."""
    kwargs: PredictKwargs = {"inputs": inputs, "session": session, "program": program}
    if options:
        kwargs["options"] = options
    return kwargs


def map_kwargs(name: str, items: list[dict[str, Any]], session: str | None, program: str | None,
               options: Options | None = None) -> MapKwargs:
    """The kwargs of one ``dspex.map`` chunk; ``options`` only when one is set."""
    kwargs: MapKwargs = {"signature": name, "items": items, "session": session, "program": program}
    if options:
        kwargs["options"] = options
    return kwargs


# -- per-request options -------------------------------------------------------------------------------------
# The LM settings a request may set, and their bounds. Never api_base, api_key, model or anything else: those
# are the worker's (ARCHITECTURE 4), and a client choosing them could send the worker's key elsewhere.
# name -> (JSON type, minimum, maximum); "id" is an integer or a 1-128 character string.
_LM_CONFIG: dict[str, tuple[str, float | None, float | None]] = {
    "max_tokens": ("integer", 1, None),
    "n": ("integer", 1, 128),  # each completion is billed: OpenAI's own ceiling
    "rollout_id": ("id", None, None),
    "temperature": ("number", 0.0, 2.0),
    "top_p": ("number", 0.0, 1.0),
}
#: The keys ``lm_config`` accepts.
LM_CONFIG_KEYS = tuple(sorted(_LM_CONFIG))
_MAX_ROLLOUT_ID_CHARS = 128


def _lm_param_problem(name: str, value: Any) -> str | None:
    kind, low, high = _LM_CONFIG[name]
    if kind == "id":
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        if isinstance(value, str) and 0 < len(value) <= _MAX_ROLLOUT_ID_CHARS:
            return None
        return f"expected an integer or a string of 1-{_MAX_ROLLOUT_ID_CHARS} characters"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected {'an integer' if kind == 'integer' else 'a number'}"
    if kind == "integer" and not isinstance(value, int):
        return "expected an integer"
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
        return f"expected {'an integer' if kind == 'integer' else 'a number'} {bounds}"
    return None


def _check_lm_config(value: Any, field: str) -> tuple[Any, list[dict[str, str]]]:
    if not isinstance(value, dict):
        return None, [{"field": field, "message": "expected an object"}]
    errors = []
    for key, item in value.items():
        if key not in _LM_CONFIG:
            errors.append({"field": f"{field}.{key}", "message": f"not allowed; allowed: {', '.join(LM_CONFIG_KEYS)}"})
        elif (problem := _lm_param_problem(key, item)) is not None:
            errors.append({"field": f"{field}.{key}", "message": problem})
    return (dict(value) or None), errors


def _check_flag(value: Any, field: str) -> tuple[Any, list[dict[str, str]]]:
    if not isinstance(value, bool):
        return None, [{"field": field, "message": "expected true or false"}]
    return (value or None), []


#: The longest ``timeout_s`` a job may ask for (a day: a result outlives it by ``DSPEX_RESULT_EXPIRES_S``).
MAX_TIMEOUT_S = 86_400.0


def _check_timeout(value: Any, field: str) -> tuple[Any, list[dict[str, str]]]:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 < value <= MAX_TIMEOUT_S:
        return None, [{"field": field, "message": f"expected a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}"}]
    return float(value), []


# One checker per option: (value, field) -> (the value to keep, or None for "not set"; errors).
_OPTIONS: dict[str, Callable[[Any, str], tuple[Any, list[dict[str, str]]]]] = {
    "lm_config": _check_lm_config,
    "trace": _check_flag,
    "stream": _check_flag,
    "timeout_s": _check_timeout,
}
#: The options a request may carry (the gateway takes them as top-level body fields).
OPTION_NAMES = tuple(_OPTIONS)


def check_options(options: Any, *, prefix: str = "options.") -> Options:
    """Validate per-request options; returns the ones set (``{}`` for None, ``trace: false`` or ``{}``).

    The one check for every sender and reader: the client before it enqueues, the gateway (``prefix=""``:
    its body fields are the option names, :data:`OPTION_NAMES`), and the worker, which trusts no sender. An option
    whose value is None counts as not set.

    Raises:
        ValidationError: naming each bad field, e.g. ``options.lm_config.api_base: not allowed; allowed:
            max_tokens, n, rollout_id, temperature, top_p``.
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValidationError.from_errors("options", [{"field": prefix.rstrip(".") or "options",
                                                       "message": "expected an object"}])
    kept: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for key, value in options.items():
        check = _OPTIONS.get(key)
        if check is None:
            errors.append({"field": f"{prefix}{key}", "message": f"unknown option; known: {', '.join(_OPTIONS)}"})
            continue
        if value is None:
            continue
        value, problems = check(value, f"{prefix}{key}")
        errors.extend(problems)
        if value is not None:
            kept[key] = value
    if errors:
        raise ValidationError.from_errors("options", errors)
    return kept  # type: ignore[return-value]  # the keys are Options' own (checked above)


def request_options(*, trace: bool = False, lm_config: dict[str, Any] | None = None, stream: bool = False,
                    timeout_s: float | None = None) -> Options:
    """The options of a request from its keyword arguments, checked (``{}`` when none is set).

    Integral floats become ints first (``max_tokens=50.0`` is 50), as :func:`json_numbers` does for inputs.
    """
    return check_options({"trace": trace, "lm_config": json_numbers(lm_config), "stream": stream,
                          "timeout_s": timeout_s})


def lm_config_schema() -> dict[str, Any]:
    """JSON Schema of ``lm_config`` (for the gateway's OpenAPI document), from the same table as the check."""
    props: dict[str, Any] = {}
    for name, (kind, low, high) in _LM_CONFIG.items():
        if kind == "id":
            props[name] = {"anyOf": [{"type": "integer"},
                                     {"type": "string", "minLength": 1, "maxLength": _MAX_ROLLOUT_ID_CHARS}]}
            continue
        schema: dict[str, Any] = {"type": kind}
        if low is not None:
            schema["minimum"] = int(low) if kind == "integer" else low
        if high is not None:
            schema["maximum"] = int(high) if kind == "integer" else high
        props[name] = schema
    return {"type": "object", "properties": props, "additionalProperties": False}


def sent_headers(now: float | None = None) -> dict[str, Any]:
    """Headers every dspex producer adds (the send time, for queue age)."""
    return {SENT_AT_HEADER: time.time() if now is None else now}


def header(request: Any, name: str) -> Any:
    """A message header as a task sees it (Celery puts custom headers in ``request.headers`` or on the request)."""
    headers = getattr(request, "headers", None)
    value = headers.get(name) if isinstance(headers, dict) else None
    return getattr(request, name, None) if value is None else value


def check_task_args(task: str, args: tuple[Any, ...], extra: dict[str, Any], expected: str) -> None:
    """Refuse positional arguments and unknown kwargs (a sender speaking another protocol).

    Raises:
        ValidationError: naming each unexpected argument and what was expected.
    """
    errors = [{"field": k, "message": f"unexpected task argument; expected {expected}"} for k in extra]
    if args:
        errors.append({"field": "args", "message": "positional arguments are not accepted; send kwargs"})
    if errors:
        raise ValidationError.from_errors(f"task arguments for '{task}'", errors)


def task_routes(predict_queue: str, optimize_queue: str) -> dict[str, dict[str, str]]:
    """Celery ``task_routes``: optimization stages to their queue, every other dspex task to predictions."""
    return {OPTIMIZE_PREFIX + "*": {"queue": optimize_queue}, PREFIX + "*": {"queue": predict_queue}}


#: Deepest nesting of objects and arrays accepted in inputs, rows and program states (Python's own recursion
#: limit would otherwise surface as a raw ``RecursionError`` from ``json``, ``jsonschema`` or pydantic).
MAX_JSON_DEPTH = 64


def check_json(value: Any, field: str, *, what: str = "payload", finite: bool = False,
               max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``max_depth`` levels (and, with ``finite``, NaN and Infinity).

    Iterative, so it never recurses itself; the one check the client's submit, map and optimize, the program
    stores and the dataset store apply before anything else walks the value.

    Raises:
        ValidationError: naming the path of the first offending value, e.g. ``trainset.3.answer``.
    """
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= max_depth:
                raise ValidationError.from_errors(what, [{
                    "field": path, "message": f"nested deeper than {max_depth} levels"}])
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend(reversed([(v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in children]))
        elif finite and isinstance(item, float) and not math.isfinite(item):
            raise ValidationError.from_errors(what, [{
                "field": path, "message": f"{item} is not a JSON number (NaN and Infinity are refused)"}])


def json_numbers(value: Any) -> Any:
    """``value`` with integral floats as ints (``3.0`` -> ``3``), as JSON Schema counts them.

    The client validates against JSON Schema, where ``3.0`` is an integer; the worker's pydantic is strict
    and would refuse it. Normalizing before sending keeps the two in agreement (the gateway parses JSON
    numbers the same way); a ``float`` field still receives a number.
    """
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**63 else value
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_numbers(v) for v in value]
    return value
