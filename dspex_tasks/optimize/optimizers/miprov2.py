"""``miprov2``: DSPy's MIPROv2 (instruction and demo proposals, Bayesian search); ``auto='light'`` by default.

Its program-aware proposer describes the program from its source. DSPy reads that with ``inspect`` and goes on
without it (a class generated or shipped without its ``.py``) or with an empty text (a factory's bare
``dspy.Predict``), saying so on stdout at most; here the proposer reads
:func:`~dspex_tasks.programs.source.program_source` instead, which falls back to the factory's source and an
outline of the module's predictors.

With ``num_trials`` (``auto`` off), trials are scored on minibatches only when the valset is larger than one:
DSPy refuses a minibatch larger than the valset instead of shrinking it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator
from typing import Any, Literal

import pydantic

from . import Optimizer, as_fractions, register

log = logging.getLogger(__name__)

#: DSPy's MIPROv2.compile default; it refuses a minibatch larger than the valset rather than shrink it.
MINIBATCH_SIZE = 35

# The program source the proposer of the run in this thread reads (None: DSPy's own lookup).
_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dspex_program_source", default=None)
_hooked = False
_hook_lock = threading.Lock()


class Params(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    auto: Literal["light", "medium", "heavy"] = "light"
    max_bootstrapped_demos: int = pydantic.Field(4, ge=0, le=32)
    max_labeled_demos: int = pydantic.Field(4, ge=0, le=64)
    num_trials: int | None = pydantic.Field(None, ge=1, le=500)


def compile(student: Any, trainset: list[Any], valset: list[Any], metric: Any, params: Params,
            common: Any) -> tuple[Any, list[float]]:
    import dspy

    from ...programs.source import program_source

    tp = dspy.MIPROv2(metric=metric, auto=params.auto if params.num_trials is None else None,
                      max_bootstrapped_demos=params.max_bootstrapped_demos,
                      max_labeled_demos=params.max_labeled_demos, num_threads=common.num_threads,
                      seed=common.seed, verbose=False,
                      num_candidates=None if params.num_trials is None else max(2, params.num_trials // 2))
    kwargs: dict[str, Any] = {"trainset": trainset, "valset": valset or None,
                              "minibatch": _minibatch(trainset, valset)}
    if params.num_trials is not None:
        kwargs["num_trials"] = params.num_trials
    with proposer_source(program_source(student)):
        compiled = tp.compile(student, **kwargs)
    trials = getattr(compiled, "trial_logs", None) or {}
    scores = [float(t["full_eval_score"]) for _, t in sorted(trials.items())
              if isinstance(t, dict) and isinstance(t.get("full_eval_score"), (int, float))]
    return compiled, as_fractions(scores)


def _minibatch(trainset: list[Any], valset: list[Any]) -> bool:
    """Score trials on minibatches only when the valset DSPy will use is larger than one minibatch."""
    n_val = len(valset) if valset else min(1000, max(1, int(len(trainset) * 0.8)))  # DSPy's own split
    return n_val > MINIBATCH_SIZE


@contextlib.contextmanager
def proposer_source(source: str) -> Iterator[None]:
    """Within the block, DSPy's ``GroundedProposer`` in this thread reads ``source`` as the program's code.

    MIPROv2 builds its proposer in the thread that called ``compile``; other threads (other runs on the
    same worker) keep their own source, or DSPy's lookup outside any block.
    """
    _hook_proposer()
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _hook_proposer() -> None:
    """Route ``GroundedProposer``'s source lookup through :data:`_SOURCE` (once per process)."""
    global _hooked
    with _hook_lock:
        if _hooked:
            return
        _hooked = True
        from dspy.propose import grounded_proposer

        original = getattr(grounded_proposer, "get_dspy_source_code", None)
        if original is None:  # another DSPy layout: its proposer keeps its own lookup
            log.warning("dspy.propose.grounded_proposer has no get_dspy_source_code: MIPROv2's proposer reads "
                        "the program source DSPy finds itself")
            return

        def get_dspy_source_code(module: Any) -> Any:
            given = _SOURCE.get()
            return original(module) if given is None else given

        get_dspy_source_code.__wrapped__ = original  # type: ignore[attr-defined]
        grounded_proposer.get_dspy_source_code = get_dspy_source_code


def estimate(n_train: int, n_val: int, params: Params) -> int:
    return 10 * (n_train + n_val)


register(Optimizer("miprov2", Params, compile, estimate, "instruction and demo search (MIPROv2)"))
