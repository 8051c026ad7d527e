"""Request checks of the gateway: JSON parsing, the job envelope, and the shape of stored program state.

JSON numbers follow JSON Schema's data model: ``3.0`` is the integer 3 (a float field accepts it as well),
so a body valid against the published schema is never rejected later by a worker's strict validation.
``NaN`` and ``Infinity`` are not JSON and are refused.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request

from ..errors import ValidationError
from .problems import Problem

__all__ = ["loads", "read_json", "envelope", "check_program_state", "integral"]

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ENVELOPE = ("inputs", "session", "program")


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


def envelope(body: Any) -> tuple[dict[str, Any], str | None, str | None]:
    """``{"inputs": {...}, "session"?, "program"?}`` -> its parts, or a 422 naming each bad field."""
    errs: list[dict[str, str]] = []
    if not isinstance(body, dict):
        errs.append({"field": "", "message": "expected a JSON object with inputs", "pointer": ""})
        body = {}
    for k in body:
        if k not in _ENVELOPE:
            errs.append({"field": k, "message": "unexpected field; expected inputs, session, program",
                         "pointer": f"/{k}"})
    if "inputs" not in body:
        errs.append({"field": "inputs", "message": "'inputs' is a required property", "pointer": "/inputs"})
    elif not isinstance(body["inputs"], dict):
        errs.append({"field": "inputs", "message": "expected an object of inputs", "pointer": "/inputs"})
    for k in ("session", "program"):
        v = body.get(k)
        if v is not None and not (isinstance(v, str) and _ID.fullmatch(v)):
            errs.append({"field": k, "message": "expected 1-128 characters of [A-Za-z0-9._:-]", "pointer": f"/{k}"})
    if errs:
        raise _problem(errs)
    return body["inputs"], body.get("session"), body.get("program")


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
