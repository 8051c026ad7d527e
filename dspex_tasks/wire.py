"""The wire format, defined once: task names, queues, headers, and the kwargs and result shapes.

Everything a sender and a worker must agree on lives here, so that a producer in another service
(``celery_app.send_task("dspex.qa", kwargs=...)``), the Python client, the gateway, the workers and the
metrics all read the same definitions.

- A program's task is ``dspex.<name>`` (:func:`task_name`; :func:`program_of` parses it back).
- ``dspex.map`` runs many inputs of one program in one message; ``dspex.optimize.*`` are the stages of an
  optimization run. Program names that would collide with them are reserved (:func:`check_program_name`).
- Kwargs are JSON objects (:class:`PredictKwargs`, :class:`MapKwargs`); results are JSON objects
  (:class:`PredictResult`, :class:`MapResult`). Nothing else is accepted, and nothing is pickled.
"""

from __future__ import annotations

import time
from typing import Any, NotRequired, TypedDict

from .errors import SignatureError, ValidationError

__all__ = [
    "PREFIX", "MAP_TASK", "OPTIMIZE_PREFIX", "STAGE_TASK", "EVAL_CHUNK_TASK", "EVAL_MERGE_TASK", "FAIL_TASK",
    "SCHEDULED_TASK", "PREDICT_QUEUE", "OPTIMIZE_QUEUE", "CELERY_DEFAULT_QUEUE", "DEFAULT_REDIS_URL", "SENT_AT_HEADER", "REQUEUE_HEADER", "SLOT_HEADER",
    "RESERVED_NAMES", "PredictKwargs", "MapKwargs", "PredictResult", "MapResult", "ItemError",
    "json_numbers", "task_name", "program_of", "check_program_name", "predict_kwargs", "map_kwargs", "sent_headers",
    "check_task_args", "task_routes", "item_error",
]

PREFIX = "dspex."
MAP_TASK = "dspex.map"
OPTIMIZE_PREFIX = "dspex.optimize."
STAGE_TASK = "dspex.optimize.stage"
EVAL_CHUNK_TASK = "dspex.optimize.eval_chunk"
EVAL_MERGE_TASK = "dspex.optimize.eval_merge"
FAIL_TASK = "dspex.optimize.fail"
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


class PredictKwargs(TypedDict):
    """Kwargs of ``dspex.<name>`` (ARCHITECTURE 3.2)."""

    inputs: dict[str, Any]
    session: str | None
    program: str | None
    options: NotRequired[dict[str, Any]]


class MapKwargs(TypedDict):
    """Kwargs of ``dspex.map``: many inputs of one program."""

    signature: str
    items: list[dict[str, Any]]
    session: str | None
    program: str | None


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


def predict_kwargs(inputs: dict[str, Any], session: str | None, program: str | None) -> PredictKwargs:
    """The kwargs of one prediction."""
    return {"inputs": inputs, "session": session, "program": program}


def map_kwargs(name: str, items: list[dict[str, Any]], session: str | None, program: str | None) -> MapKwargs:
    """The kwargs of one ``dspex.map`` chunk."""
    return {"signature": name, "items": items, "session": session, "program": program}


def sent_headers(now: float | None = None) -> dict[str, Any]:
    """Headers every dspex producer adds (the send time, for queue age)."""
    return {SENT_AT_HEADER: time.time() if now is None else now}


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
