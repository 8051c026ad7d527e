"""``bootstrap_few_shot``: DSPy's BootstrapFewShot (labeled plus bootstrapped demos)."""

from __future__ import annotations

from typing import Any

import pydantic

from . import Optimizer, register


class Params(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    max_bootstrapped_demos: int = pydantic.Field(4, ge=0, le=32)
    max_labeled_demos: int = pydantic.Field(8, ge=0, le=64)
    max_rounds: int = pydantic.Field(1, ge=1, le=10)
    metric_threshold: float | None = None


def compile(student: Any, trainset: list[Any], valset: list[Any], metric: Any, params: Params,
            common: Any) -> tuple[Any, list[float]]:
    import dspy

    tp = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=params.max_bootstrapped_demos,
                               max_labeled_demos=params.max_labeled_demos, max_rounds=params.max_rounds,
                               metric_threshold=params.metric_threshold)
    return tp.compile(student, trainset=trainset), []


def estimate(n_train: int, n_val: int, params: Params) -> int:
    return n_train * params.max_rounds


register(Optimizer("bootstrap_few_shot", Params, compile, estimate,
                   "demos from labeled examples and traces the metric accepts"))
