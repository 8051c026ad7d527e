"""Training data: rows validated against a signature's published schemas, and named datasets in Redis.

dspy-free, so clients validate before anything is enqueued; workers validate again.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .. import keys, wire
from ..errors import DatasetNotFound, ValidationError

__all__ = ["validate_rows", "normalize_rows", "labels", "split", "DatasetStore"]

MAX_ROWS = 100_000


def example_schema(description: dict[str, Any]) -> dict[str, Any]:
    """A row: every required input, typed as the interface types it; any other field is a label.

    Labels are whatever the metric reads (``example.answer``, ``example.expected_people``): the
    interface's own output fields or any other name, with any JSON value. Only inputs are checked.
    """
    ins = description["input_schema"]
    return {
        "type": "object",
        "properties": dict(ins.get("properties", {})),
        "required": list(ins.get("required", [])),
        "additionalProperties": True,
    }


def labels(row: dict[str, Any], description: dict[str, Any]) -> list[str]:
    """The fields of ``row`` that are labels (everything that is not an interface input)."""
    inputs = description["input_schema"].get("properties", {})
    return [k for k in row if k not in inputs]


def validate_rows(rows: Any, description: dict[str, Any], *, what: str = "trainset") -> list[dict[str, Any]]:
    """Check every row's inputs; a bad row is reported by index and field.

    Rows may be plain objects or what ``dspy.Example`` dumps (see :func:`normalize_rows`).

    Raises:
        ValidationError: with fields like ``trainset.3.question``.
    """
    from jsonschema import Draft202012Validator

    checked = normalize_rows(rows, what=what)
    if len(checked) > MAX_ROWS:
        raise ValidationError.from_errors(what, [{"field": what, "message": f"more than {MAX_ROWS} rows"}])
    wire.check_json(checked, what, what=what, finite=True)
    validator = Draft202012Validator(example_schema(description))
    errors: list[dict[str, str]] = []
    for i, row in enumerate(checked):
        for e in validator.iter_errors(row):
            path = ".".join(str(p) for p in e.absolute_path)
            if not path and e.validator == "required":
                path = next((p for p in e.validator_value if isinstance(row, dict) and p not in row), "")
            errors.append({"field": f"{what}.{i}" + (f".{path}" if path else ""), "message": e.message})
        if len(errors) >= 20:
            break
    if errors:
        raise ValidationError.from_errors(what, errors)
    return checked


#: Keys ``dspy.Example`` carries beside a row's fields (its bookkeeping, never data).
_EXAMPLE_KEYS = frozenset({"_input_keys", "_demos", "dspy_uuid", "dspy_split"})


def normalize_rows(rows: Any, *, what: str = "trainset") -> list[dict[str, Any]]:
    """Rows as plain dicts: ``dspy.Example`` objects (anything with ``toDict()``) and their JSON dumps
    (``{"_store": {...}, "_input_keys": [...]}`` as ``vars(example)`` gives, or ``toDict()`` output) become
    their fields; dspy's bookkeeping keys are dropped. dspy-free.

    Raises:
        ValidationError: when ``rows`` is not a list of objects.
    """
    if isinstance(rows, tuple):
        rows = list(rows)
    if not isinstance(rows, list):
        raise ValidationError.from_errors(what, [{"field": what, "message": "expected a list of objects"}])
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) and callable(getattr(row, "toDict", None)):
            row = row.toDict()
        if not isinstance(row, dict):
            raise ValidationError.from_errors(what, [{
                "field": f"{what}.{i}", "message": f"expected an object, got {type(row).__name__}"}])
        if isinstance(row.get("_store"), dict):
            row = row["_store"]
        out.append({k: v for k, v in row.items() if k not in _EXAMPLE_KEYS})
    return out


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
        rows = normalize_rows(rows, what=name)
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
