"""Request checks of the gateway: JSON parsing, the job envelope, and the shape of stored program state.

JSON numbers follow JSON Schema's data model: ``3.0`` is the integer 3 (a float field accepts it as well),
so a body valid against the published schema is never rejected later by a worker's strict validation.
``NaN`` and ``Infinity`` are not JSON and are refused.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

from fastapi import Request

from .. import wire
from ..errors import ValidationError
from .problems import Problem

__all__ = ["loads", "read_json", "JobRequest", "envelope", "check_program_state", "integral"]

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: Body fields of a job request; the per-request options (``wire.Options``) are top-level fields too.
_ENVELOPE = ("inputs", "session", "program", *wire.OPTION_NAMES)


def _no_constant(value: str) -> Any:
    raise ValueError(f"{value} is not JSON")


def _number(text: str) -> int | float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return int(value) if value.is_integer() else value


def integral(value: Any) -> Any:
    """``3.0`` -> ``3`` (for pydantic ``BeforeValidator``); anything else unchanged."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def loads(raw: bytes | str) -> Any:
    return json.loads(raw, parse_constant=_no_constant, parse_float=_number)


async def read_json(request: Request) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise Problem(415, "unsupported_media_type", f"expected application/json, got {ctype}")
    raw = await request.body()
    try:
        return loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Problem(400, "malformed_json", "the request body is not valid JSON") from None


def _problem(errs: list[dict[str, str]]) -> Problem:
    shown = "; ".join(f"{e['field'] or '<root>'}: {e['message']}" for e in errs[:5])
    return Problem(422, ValidationError.code, f"invalid request: {shown}", errors=errs)


class JobRequest(NamedTuple):
    """A job request's parts; ``options`` as ``wire.check_options`` returns them."""

    inputs: dict[str, Any]
    session: str | None
    program: str | None
    options: wire.Options


def envelope(body: Any) -> JobRequest:
    """``{"inputs": {...}, "session"?, "program"?, "trace"?, "lm_config"?, "stream"?, "timeout_s"?}`` -> its
    parts, or a 422 naming each bad field (``lm_config.api_base: not allowed; ...``)."""
    errs: list[dict[str, str]] = []
    if not isinstance(body, dict):
        errs.append({"field": "", "message": "expected a JSON object with inputs", "pointer": ""})
        body = {}
    for k in body:
        if k not in _ENVELOPE:
            errs.append({"field": k, "message": f"unexpected field; expected {', '.join(_ENVELOPE)}",
                         "pointer": f"/{k}"})
    if "inputs" not in body:
        errs.append({"field": "inputs", "message": "'inputs' is a required property", "pointer": "/inputs"})
    elif not isinstance(body["inputs"], dict):
        errs.append({"field": "inputs", "message": "expected an object of inputs", "pointer": "/inputs"})
    for k in ("session", "program"):
        v = body.get(k)
        if v is not None and not (isinstance(v, str) and _ID.fullmatch(v)):
            errs.append({"field": k, "message": "expected 1-128 characters of [A-Za-z0-9._:-]", "pointer": f"/{k}"})
    options: wire.Options = {}
    try:
        options = wire.check_options({k: body[k] for k in wire.OPTION_NAMES if k in body}, prefix="")
    except ValidationError as exc:
        errs += [{**e, "pointer": "/" + e["field"].replace(".", "/")} for e in exc.errors]
    if errs:
        raise _problem(errs)
    return JobRequest(body["inputs"], body.get("session"), body.get("program"), options)


def _demo_lists(state: dict[str, Any]) -> list[tuple[str, Any]]:
    """Where DSPy state keeps demos: ``demos`` (short form) and ``<predictor>.demos``."""
    found = [("state.demos", state["demos"])] if "demos" in state else []
    found += [(f"state.{k}.demos", v["demos"]) for k, v in state.items() if isinstance(v, dict) and "demos" in v]
    return found


def check_program_state(state: dict[str, Any]) -> None:
    """Demos must be lists of objects (what a worker would refuse when loading the program, refused now).

    Raises a 422 problem naming each bad field.
    """
    errs = [{"field": where, "message": "expected a list of objects", "pointer": "/" + where.replace(".", "/")}
            for where, demos in _demo_lists(state)
            if not isinstance(demos, list) or not all(isinstance(d, dict) for d in demos)]
    if errs:
        raise _problem(errs)
