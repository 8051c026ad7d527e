"""``miprov2``: DSPy's MIPROv2 (instruction and demo proposals, Bayesian search); ``auto='light'`` by default."""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from . import Optimizer, as_fractions, register


class Params(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    auto: Literal["light", "medium", "heavy"] = "light"
    max_bootstrapped_demos: int = pydantic.Field(4, ge=0, le=32)
    max_labeled_demos: int = pydantic.Field(4, ge=0, le=64)
    num_trials: int | None = pydantic.Field(None, ge=1, le=500)


def compile(student: Any, trainset: list[Any], valset: list[Any], metric: Any, params: Params,
            common: Any) -> tuple[Any, list[float]]:
    import dspy

    tp = dspy.MIPROv2(metric=metric, auto=params.auto if params.num_trials is None else None,
                      max_bootstrapped_demos=params.max_bootstrapped_demos,
                      max_labeled_demos=params.max_labeled_demos, num_threads=common.num_threads,
                      seed=common.seed, verbose=False,
                      num_candidates=None if params.num_trials is None else max(2, params.num_trials // 2))
    kwargs: dict[str, Any] = {"trainset": trainset, "valset": valset or None}
    if params.num_trials is not None:
        kwargs["num_trials"] = params.num_trials
    compiled = tp.compile(student, **kwargs)
    trials = getattr(compiled, "trial_logs", None) or {}
    scores = [float(t["full_eval_score"]) for _, t in sorted(trials.items())
              if isinstance(t, dict) and isinstance(t.get("full_eval_score"), (int, float))]
    return compiled, as_fractions(scores)


def estimate(n_train: int, n_val: int, params: Params) -> int:
    return 10 * (n_train + n_val)


register(Optimizer("miprov2", Params, compile, estimate, "instruction and demo search (MIPROv2)"))
