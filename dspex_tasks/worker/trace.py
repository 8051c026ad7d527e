"""A job's predictor trace (``options.trace``): DSPy's own trace, as JSON.

DSPy records every predictor call in ``dspy.settings.trace`` as ``(predictor, inputs, prediction)``
(``Predict._forward_postprocess``, which also honours ``max_trace_size``); ``Refine`` and ``BestOfN`` read
it and extend it with their best attempt. :class:`~dspex_tasks.worker.runner.ModuleRunner` gives each run
a list of its own, and this module turns a traced run's list into :class:`~dspex_tasks.wire.TraceEntry`
dicts: the predictor named as the served module's ``named_predictors()`` names it, inputs and outputs
made JSON-safe (pydantic models dumped, anything else JSON cannot hold as its ``str``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..wire import TraceEntry

__all__ = ["trace_entries", "json_safe"]

_MAX_DEPTH = 32


def json_safe(value: Any, _depth: int = 0) -> Any:
    """``value`` as JSON data: containers walked, pydantic models dumped, the rest as strings."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _depth >= _MAX_DEPTH:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, _depth + 1) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        try:
            return json_safe(dump(mode="json"), _depth + 1)
        except Exception:  # a model that cannot dump itself is still shown
            return str(value)
    to_dict = getattr(value, "toDict", None)  # dspy.Example / dspy.Prediction
    if callable(to_dict):
        return json_safe(to_dict(), _depth + 1)
    return str(value)


def _outputs(prediction: Any) -> dict[str, Any]:
    items = getattr(prediction, "items", None)
    if callable(items):
        return {str(k): json_safe(v) for k, v in items()}
    return {"value": json_safe(prediction)}


def trace_entries(module: Any, trace: Iterable[tuple[Any, Any, Any]]) -> list[TraceEntry]:
    """DSPy's trace of one run of ``module`` as JSON entries, in call order.

    A predictor the module does not hold itself (a copy ``Refine``/``BestOfN`` ran, or one made inside
    ``forward``) is named by the module's predictor with the same signature, else by its signature's name.
    """
    named = list(module.named_predictors())
    by_id = {id(p): name for name, p in named}
    by_signature: dict[int, str] = {}
    for name, p in named:
        if getattr(p, "signature", None) is not None:
            by_signature.setdefault(id(p.signature), name)
    out: list[TraceEntry] = []
    for predictor, inputs, prediction in trace:
        signature = getattr(predictor, "signature", None)
        name = by_id.get(id(predictor)) or (by_signature.get(id(signature)) if signature is not None else None) \
            or str(getattr(signature, "__name__", type(predictor).__name__))
        out.append({"predictor": name, "inputs": json_safe(dict(inputs or {})), "outputs": _outputs(prediction)})
    return out
