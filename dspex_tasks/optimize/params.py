"""Optimizer params against the JSON Schemas workers publish: dspy-free and pydantic-free, for the client.

Workers publish one schema per optimizer (its own params plus the common ones) under the
``optimizer_params`` field of ``keys.capabilities``; :func:`check_params` validates a run's
params against it before anything is enqueued. The worker checks again with the pydantic models
(:meth:`Optimizer.parse_params`), with the same unknown-key message.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from ..errors import ValidationError

__all__ = ["check_params", "unknown_param_message"]


def unknown_param_message(key: str, known: Iterable[str], optimizer: str) -> str:
    """``unknown param 'x' for optimizer 'y'; did you mean 'z'? (known: ...)``."""
    names = sorted(set(known))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown param '{key}' for optimizer '{optimizer}'{hint} (known: {', '.join(names) or 'none'})"


def check_params(params: dict[str, Any], optimizer: str, schema: dict[str, Any] | None) -> None:
    """Validate ``params`` against ``optimizer``'s published schema; nothing to check without one.

    Raises:
        ValidationError: naming each bad field as ``params.<name>``.
    """
    if not schema:
        return
    from jsonschema import Draft202012Validator

    props: dict[str, Any] = schema.get("properties") or {}
    errors: list[dict[str, str]] = []
    rest = dict(params)
    if schema.get("additionalProperties") is False:
        for key in params:
            if key not in props:
                errors.append({"field": f"params.{key}", "message": unknown_param_message(key, props, optimizer)})
                rest.pop(key)
    for e in sorted(Draft202012Validator(schema).iter_errors(rest), key=lambda e: [str(p) for p in e.absolute_path]):
        path = [str(p) for p in e.absolute_path]
        if not path and e.validator == "required" and isinstance(e.instance, dict):
            path = [next((str(r) for r in e.validator_value if r not in e.instance), "")]
        errors.append({"field": ".".join(["params", *path]).rstrip("."), "message": e.message})
    if errors:
        raise ValidationError.from_errors(f"params for optimizer '{optimizer}'", errors)
