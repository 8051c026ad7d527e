"""JSON Schemas for signatures, generic and in providers' forms.

The generic schema is JSON Schema 2020-12. The OpenAI form obeys strict
structured-output rules at every level: every property required,
``additionalProperties: false``, optional values as a union with ``null``, and
only the keywords strict mode supports. The Anthropic form is a tool definition.
"""

from __future__ import annotations

import copy as _copy
import re
from typing import TYPE_CHECKING, Any

from ..errors import SignatureError

if TYPE_CHECKING:  # pragma: no cover
    from .types import TypeNode

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# Keywords OpenAI strict mode accepts (its structured-outputs guide).
OPENAI_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "enum", "const",
        "anyOf", "description", "title", "$defs", "$ref", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "pattern", "format",
        "minItems", "maxItems",
    }
)
_OPENAI_NAME = re.compile(r"[^A-Za-z0-9_-]")


def copy(schema: dict[str, Any]) -> dict[str, Any]:
    return _copy.deepcopy(schema)


def object_schema(title: str, fields: dict[str, TypeNode], description: str | None = None) -> dict[str, Any]:
    """The schema of an object with one property per field (nullable ones optional)."""
    properties: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    for name, node in fields.items():
        prop = node.json_schema()
        defs.update(prop.pop("$defs", {}))  # a model's $defs live at the root, where "#/$defs/..." points
        properties[name] = prop
    schema: dict[str, Any] = {
        "$schema": DIALECT,
        "title": title,
        "type": "object",
        "properties": properties,
        "required": [name for name, node in fields.items() if not node.nullable],
        "additionalProperties": False,
    }
    if defs:
        schema["$defs"] = defs
    if description:
        schema["description"] = description
    return schema


def _strict(schema: dict[str, Any], path: str) -> dict[str, Any]:
    unsupported = set(schema) - OPENAI_KEYWORDS
    # propertyNames has no strict-mode equivalent; we drop it and say so in the description.
    out: dict[str, Any] = {k: v for k, v in schema.items() if k in OPENAI_KEYWORDS}
    for key in unsupported - {"propertyNames", "$schema", "default"}:  # a default says nothing to a strict LM
        raise SignatureError(f"field '{path}' uses '{key}', which OpenAI strict mode does not support")
    if not schema:
        raise SignatureError(
            f"field '{path}' is 'any' (free-form JSON), which OpenAI strict structured outputs cannot express; "
            "use a concrete type or json_schema('generic')"
        )
    if "$defs" in schema:
        out["$defs"] = {name: _strict(sub, f"{path}$defs.{name}") for name, sub in schema["$defs"].items()}
    if "$ref" in schema:
        return out
    if "anyOf" in schema:
        out["anyOf"] = [_strict(s, path) for s in schema["anyOf"]]
        return out
    if schema.get("type") == "object":
        props = schema.get("properties")
        if props is None:
            raise SignatureError(
                f"field '{path}' is an open-ended mapping (dict), which OpenAI strict structured outputs cannot "
                "express (every object needs fixed properties); use a list of entities or json_schema('generic')"
            )
        required = set(schema.get("required", []))
        new_props = {}
        for name, sub in props.items():
            strict_sub = _strict(sub, f"{path}.{name}" if path else name)
            if name not in required and not _is_nullable(strict_sub):
                strict_sub = {"anyOf": [strict_sub, {"type": "null"}]}
            new_props[name] = strict_sub
        out["properties"] = new_props
        out["required"] = list(props)
        out["additionalProperties"] = False
    if schema.get("type") == "array" and "items" in schema:
        out["items"] = _strict(schema["items"], f"{path}[]")
    return out


def _is_nullable(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "null" or any(_is_nullable(s) for s in schema.get("anyOf", []))


def openai_response_format(name: str, output_schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI ``response_format`` for strict structured outputs.

    Raises:
        SignatureError: when a field cannot be expressed in strict mode (``any``, open ``dict``).
    """
    schema = _strict({k: v for k, v in output_schema.items() if k != "$schema"}, "")
    return {
        "type": "json_schema",
        "json_schema": {"name": _OPENAI_NAME.sub("_", name)[:64], "strict": True, "schema": schema},
    }


def anthropic_tool(name: str, description: str, output_schema: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic tool whose input is the signature's outputs (forced tool use)."""
    schema = {k: v for k, v in output_schema.items() if k not in ("$schema", "title")}
    return {"name": _OPENAI_NAME.sub("_", name)[:64], "description": description, "input_schema": schema}
