"""HTML forms: reading a posted form (no python-multipart: URL-encoded bodies only), the same-origin check for
state-changing posts, and the job form generated from a signature's published input schema.

Each input field becomes a control by its JSON Schema: a string a text box (a select with ``enum``), an integer or
number a number box, a boolean a yes/no select, anything else (lists, objects, typed records) a JSON text box. A
field whose schema admits null (``Optional``) may be left empty: it is left out of the inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request

from .auth import Forbidden

__all__ = ["FormField", "check_same_origin", "form_fields", "parse_inputs", "read_form"]

_MAX_FIELDS = 200


async def read_form(request: Request) -> dict[str, str]:
    """The fields of a posted ``application/x-www-form-urlencoded`` body (the last value of a repeated name)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise Forbidden(f"expected a form (application/x-www-form-urlencoded), got {ctype or 'no content type'}")
    body = (await request.body()).decode("utf-8", "replace")
    parsed = parse_qs(body, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    return {k: v[-1] for k, v in parsed.items()}


def check_same_origin(request: Request) -> None:
    """Raises Forbidden for a post another site's page made (on top of the SameSite=Lax cookie): a browser sends
    ``Origin`` (and ``Sec-Fetch-Site``) with every form post."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise Forbidden("a cross-site form post is refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise Forbidden(f"a form post from {origin} is refused (this console is {host})")


@dataclass(frozen=True)
class FormField:
    """One input field's control."""

    name: str
    kind: str  # text, integer, number, boolean, enum, json
    required: bool
    description: str = ""
    choices: list[str] = field(default_factory=list)
    example: str = ""


def _nullable(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the schema without its null alternative, whether null is allowed)."""
    options = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(options, list):
        rest = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
        if len(rest) < len(options):
            return (rest[0] if len(rest) == 1 and isinstance(rest[0], dict) else {"anyOf": rest}), True
    kind = schema.get("type")
    if isinstance(kind, list) and "null" in kind:
        others = [t for t in kind if t != "null"]
        return {**schema, "type": others[0] if len(others) == 1 else others}, True
    return schema, False


def form_fields(schema: dict[str, Any]) -> list[FormField]:
    """The controls of an input schema's properties, in order."""
    required = set(schema.get("required") or [])
    out = []
    for name, raw in (schema.get("properties") or {}).items():
        prop, nullable = _nullable(raw if isinstance(raw, dict) else {})
        kind = prop.get("type")
        desc = str(raw.get("description") or prop.get("description") or "") if isinstance(raw, dict) else ""
        need = name in required and not nullable
        if isinstance(prop.get("enum"), list) and all(isinstance(v, str) for v in prop["enum"]):
            out.append(FormField(name, "enum", need, desc, [str(v) for v in prop["enum"]]))
        elif kind in ("string", "integer", "number", "boolean"):
            out.append(FormField(name, "text" if kind == "string" else str(kind), need, desc))
        else:
            example = '["…"]' if kind == "array" else "{…}" if kind == "object" else "JSON"
            out.append(FormField(name, "json", need, desc, example=example))
    return out


def parse_inputs(schema: dict[str, Any], values: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(inputs, errors) from the posted ``in.<field>`` values; the schema itself is checked on submit."""
    inputs: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for f in form_fields(schema):
        text = values.get(f"in.{f.name}", "")
        if text.strip() == "" and f.kind != "text":
            if f.required:
                errors.append({"field": f.name, "message": "required"})
            continue
        if text == "" and not f.required:
            continue
        try:
            if f.kind == "integer":
                inputs[f.name] = int(text.strip())
            elif f.kind == "number":
                inputs[f.name] = float(text.strip())
            elif f.kind == "boolean":
                inputs[f.name] = {"true": True, "false": False}[text.strip()]
            elif f.kind == "json":
                inputs[f.name] = json.loads(text)
            else:
                inputs[f.name] = text
        except (ValueError, KeyError) as exc:
            errors.append({"field": f.name, "message": f"not a valid {f.kind}: {exc}"})
    return inputs, errors
