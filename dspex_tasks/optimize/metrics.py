"""Metrics by name: built-ins and user metrics registered in signature modules.

A metric is ``fn(example: dict, prediction: dict, trace=None) -> float`` (bool
counts as 0/1). It may also return ``{"score": float, "feedback": str}`` (or a
``dspy.Prediction`` with ``score`` and ``feedback``): the feedback is text a reflective
optimizer (``gepa``) reads to improve the program; everywhere else only the score counts
(:func:`metric_score`). Metrics are looked up by name on the worker; functions never
travel in messages.

Example:
    >>> from dspex_tasks.optimize.metrics import metric
    >>> @metric("answer_len_ok")
    ... def answer_len_ok(example, prediction, trace=None):
    ...     return len(prediction["answer"]) < 200
    >>> @metric("short_answer")
    ... def short_answer(example, prediction, trace=None):
    ...     ok = len(prediction["answer"]) < 200
    ...     return {"score": float(ok), "feedback": "" if ok else "Answer in fewer than 200 characters."}
"""

from __future__ import annotations

import functools
import re
import string
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ValidationError

__all__ = ["metric", "get_metric", "metric_names", "metric_score", "metric_feedback", "scoring", "exact_match",
           "contains", "f1", "MetricFn"]

MetricFn = Callable[..., Any]
_METRICS: dict[str, MetricFn] = {}
_lock = threading.Lock()


def metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn`` under ``name`` (a decorator)."""

    def register(fn: MetricFn) -> MetricFn:
        with _lock:
            _METRICS[name] = fn
        return fn

    return register


def get_metric(name: str) -> MetricFn:
    try:
        return _METRICS[name]
    except KeyError:
        raise ValidationError.from_errors(
            "optimization", [{"field": "metric", "message": f"unknown metric '{name}'; known: {', '.join(metric_names())}"}]
        ) from None


def metric_names() -> list[str]:
    return sorted(_METRICS)


def _part(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name)
    try:  # dspy.Prediction (and any object with the attribute)
        return getattr(value, name, None)
    except Exception:  # noqa: BLE001 - an object whose attribute lookup fails has no such part
        return None


def metric_score(value: Any) -> float:
    """A metric's result as a number: a float or int, a bool (0/1), or the ``score`` of a
    ``{"score", "feedback"}`` dict or a ``dspy.Prediction``.

    Raises:
        TypeError: the result is none of these (a bug in the metric: the run fails, naming the type).
    """
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    score = _part(value, "score")
    if isinstance(score, bool | int | float):
        return float(score)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"a metric returned {type(value).__name__}; expected a number, a bool, or "
                        '{"score": float, "feedback": str}') from None


def metric_feedback(value: Any) -> str | None:
    """The feedback text of a metric's result, if it has one (``{"score", "feedback"}`` or ``dspy.Prediction``)."""
    if isinstance(value, bool | int | float):
        return None
    feedback = _part(value, "feedback")
    return str(feedback) if feedback is not None and str(feedback).strip() else None


def scoring(fn: MetricFn) -> MetricFn:
    """``fn`` returning its score only (:func:`metric_score`), for optimizers that read a metric's
    result as a number or a truth value (BootstrapFewShot, MIPROv2)."""

    @functools.wraps(fn)
    def scored(example: Any, prediction: Any, trace: Any = None) -> float:
        return metric_score(fn(example, prediction, trace))

    return scored


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if hasattr(value, "items"):
        return dict(value.items())
    return {}


def _labelled(example: Any, prediction: Any) -> list[tuple[Any, Any]]:
    """(expected, predicted) for every field both the example and the prediction carry.

    Inputs never appear in a prediction, so these are the example's output labels.
    """
    pred = _as_dict(prediction)
    return [(v, pred[k]) for k, v in _as_dict(example).items() if k in pred and not k.startswith(("_", "dspy_"))]


def _norm(value: Any) -> str:
    text = str(value).lower().strip()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return re.sub(r"\s+", " ", text)


@metric("exact_match")
def exact_match(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when every labelled output equals the prediction (case, punctuation and spacing ignored for text)."""
    pairs = _labelled(example, prediction)
    if not pairs:
        return 0.0
    ok = all((_norm(e) == _norm(p)) if isinstance(e, str) else e == p for e, p in pairs)
    return 1.0 if ok else 0.0


@metric("contains")
def contains(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when every labelled text output appears inside the predicted text."""
    pairs = _labelled(example, prediction)
    if not pairs:
        return 0.0
    return 1.0 if all(_norm(e) in _norm(p) for e, p in pairs) else 0.0


@metric("f1")
def f1(example: Any, prediction: Any, trace: Any = None) -> float:
    """Token F1 between labelled and predicted text, averaged over labelled outputs."""
    pairs = _labelled(example, prediction)
    if not pairs:
        return 0.0
    scores = []
    for e, p in pairs:
        gold, pred = _norm(e).split(), _norm(p).split()
        common = sum((Counter(gold) & Counter(pred)).values())
        if not gold and not pred:
            scores.append(1.0)
        elif common == 0:
            scores.append(0.0)
        else:
            precision, recall = common / len(pred), common / len(gold)
            scores.append(2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)
