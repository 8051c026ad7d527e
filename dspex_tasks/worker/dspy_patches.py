"""Two memoizations of pure, repeated work inside DSPy 3.4 (applied once per worker process).

Measured by ``benchmarks/bench_signatures.py`` and ``bench_runtime.py`` (see BENCHMARKS.md):

- DSPy prices every LM call by looking the model up in its price table; for a model it does
  not know (a self-hosted or mock endpoint) that is a scan of the whole table, ~2 ms of GIL
  per call. The table is static once loaded.
- DSPy's adapters rebuild a pydantic ``TypeAdapter`` and its JSON Schema for every typed
  output field on every call, to write the same prompt text; for the ComplexAnalysis
  signature that is ~0.8 ms of a ~1.8 ms call.

Both functions are pure for a given argument; results are deep-copied, so callers that
mutate them cannot poison the cache. Anything unhashable falls through to DSPy.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["apply_dspy_speedups"]

_applied = False
_lock = threading.Lock()


def _memo(original: Callable[..., Any], maxsize: int = 1024) -> Callable[..., Any]:
    cached = functools.lru_cache(maxsize=maxsize)(original)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            key_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
            return copy.deepcopy(cached(*args, **key_kwargs))
        except TypeError:  # unhashable: do exactly what DSPy does
            return original(*args, **kwargs)

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def apply_dspy_speedups() -> bool:
    """Memoize DSPy's model-price lookup and per-field JSON Schema building; idempotent."""
    global _applied
    with _lock:
        if _applied:
            return False
        try:
            from dspy.adapters import utils as adapter_utils
            from dspy.clients import costs, model_metadata
        except ImportError:  # pragma: no cover - another DSPy layout: nothing to speed up
            return False
        original_info = model_metadata.model_info
        memo_info = _memo(original_info)
        model_metadata.model_info = memo_info
        if getattr(costs, "model_info", None) is original_info:
            costs.model_info = memo_info
        if hasattr(adapter_utils, "_get_json_schema"):
            adapter_utils._get_json_schema = _memo(adapter_utils._get_json_schema)
        _applied = True
        return True
