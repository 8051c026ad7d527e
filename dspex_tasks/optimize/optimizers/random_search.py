"""``bootstrap_few_shot_with_random_search``: several bootstrapped candidates, the best on the valset."""

from __future__ import annotations

from typing import Any

import pydantic

from . import Optimizer, as_fractions, register


class Params(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    max_bootstrapped_demos: int = pydantic.Field(4, ge=0, le=32)
    max_labeled_demos: int = pydantic.Field(8, ge=0, le=64)
    num_candidate_programs: int = pydantic.Field(4, ge=1, le=64)
    max_rounds: int = pydantic.Field(1, ge=1, le=10)


def compile(student: Any, trainset: list[Any], valset: list[Any], metric: Any, params: Params,
            common: Any) -> tuple[Any, list[float]]:
    import dspy

    tp = dspy.BootstrapFewShotWithRandomSearch(
        metric=metric, max_bootstrapped_demos=params.max_bootstrapped_demos,
        max_labeled_demos=params.max_labeled_demos, num_candidate_programs=params.num_candidate_programs,
        max_rounds=params.max_rounds, num_threads=common.num_threads)
    compiled = tp.compile(student, trainset=trainset, valset=valset or None)
    # DSPy keeps the candidates best first; the trial order is by seed.
    candidates = sorted(getattr(compiled, "candidate_programs", []), key=lambda c: c.get("seed", 0))
    scores = [float(c["score"]) for c in candidates if isinstance(c.get("score"), (int, float))]
    for attr in ("candidate_programs",):  # holds module objects: not state to keep
        if hasattr(compiled, attr):
            delattr(compiled, attr)
    return compiled, as_fractions(scores)


def estimate(n_train: int, n_val: int, params: Params) -> int:
    return (params.num_candidate_programs + 3) * (n_train + n_val)


register(Optimizer("bootstrap_few_shot_with_random_search", Params, compile, estimate,
                   "random search over bootstrapped demo sets, scored on the valset"))
