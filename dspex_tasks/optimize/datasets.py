"""Training data: rows validated against a signature's published schemas, and named datasets in Redis.

dspy-free, so clients validate before anything is enqueued; workers validate again.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .. import keys, wire
from ..errors import DatasetNotFound, ValidationError

__all__ = ["validate_rows", "split", "DatasetStore"]

MAX_ROWS = 100_000


def example_schema(description: dict[str, Any]) -> dict[str, Any]:
    """A row: every required input, any subset of outputs (the labels), nothing else."""
    ins, outs = description["input_schema"], description["output_schema"]
    return {
        "type": "object",
        "properties": {**ins.get("properties", {}), **outs.get("properties", {})},
        "required": list(ins.get("required", [])),
        "additionalProperties": False,
    }


def validate_rows(rows: Any, description: dict[str, Any], *, what: str = "trainset") -> list[dict[str, Any]]:
    """Check every row; a bad row is reported by index and field.

    Raises:
        ValidationError: with fields like ``trainset.3.question``.
    """
    from jsonschema import Draft202012Validator

    if not isinstance(rows, list):
        raise ValidationError.from_errors(what, [{"field": what, "message": "expected a list of objects"}])
    if len(rows) > MAX_ROWS:
        raise ValidationError.from_errors(what, [{"field": what, "message": f"more than {MAX_ROWS} rows"}])
    wire.check_json(rows, what, what=what, finite=True)
    validator = Draft202012Validator(example_schema(description))
    outputs = list(description["output_schema"].get("properties", {}))
    errors: list[dict[str, str]] = []
    for i, row in enumerate(rows):
        for e in validator.iter_errors(row):
            path = ".".join(str(p) for p in e.absolute_path)
            if not path and e.validator == "required":
                path = next((p for p in e.validator_value if isinstance(row, dict) and p not in row), "")
            if not path and e.validator == "additionalProperties" and isinstance(row, dict):
                allowed = set(example_schema(description)["properties"])
                path = next((p for p in row if p not in allowed), "")
            errors.append({"field": f"{what}.{i}" + (f".{path}" if path else ""), "message": e.message})
        if isinstance(row, dict) and not any(k in row for k in outputs):
            errors.append({"field": f"{what}.{i}", "message": f"no label: expected at least one of {', '.join(outputs)}"})
        if len(errors) >= 20:
            break
    if errors:
        raise ValidationError.from_errors(what, errors)
    return rows


def split(rows: list[dict[str, Any]], val_fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out a deterministic share of ``rows`` for validation (at least one row each side)."""
    if len(rows) < 2:
        raise ValidationError.from_errors("trainset", [{
            "field": "trainset", "message": "need at least 2 rows to hold out a validation set (or pass a valset)"}])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


class DatasetStore:
    """Named datasets (JSON rows) in Redis."""

    def __init__(self, *, redis: Any, namespace: str = "dspex", max_bytes: int = 50_000_000) -> None:
        self.redis = redis
        self.ns = namespace
        self.max_bytes = max_bytes

    def put(self, name: str, rows: list[dict[str, Any]]) -> int:
        """Store ``rows`` under ``name`` (replacing it); returns the row count."""
        keys.check_id(name, "dataset")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValidationError.from_errors("dataset", [{"field": name, "message": "expected a list of objects"}])
        wire.check_json(rows, name, what="dataset", finite=True)  # names the row and field: ``name.3.answer``
        text = json.dumps(rows, separators=(",", ":"), allow_nan=False)
        if len(text) > self.max_bytes:
            raise ValidationError.from_errors("dataset", [{"field": name, "message": f"over {self.max_bytes} bytes"}])
        pipe = self.redis.pipeline()
        pipe.set(keys.dataset(self.ns, name), text)
        pipe.sadd(keys.datasets(self.ns), name)
        pipe.execute()
        return len(rows)

    def get(self, name: str) -> list[dict[str, Any]]:
        keys.check_id(name, "dataset")
        raw = self.redis.get(keys.dataset(self.ns, name))
        if raw is None:
            raise DatasetNotFound(f"no dataset '{name}'")
        rows: list[dict[str, Any]] = json.loads(raw)
        return rows

    def list(self) -> list[str]:
        return sorted(m.decode() if isinstance(m, bytes) else m for m in self.redis.smembers(keys.datasets(self.ns)))

    def delete(self, name: str) -> None:
        keys.check_id(name, "dataset")
        pipe = self.redis.pipeline()
        pipe.delete(keys.dataset(self.ns, name))
        pipe.srem(keys.datasets(self.ns), name)
        pipe.execute()
