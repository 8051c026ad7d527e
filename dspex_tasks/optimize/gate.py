"""The promotion gate: does the candidate beat the baseline by more than the noise of a small valset?

A run scores the baseline and the candidate on the same validation rows, so the
per-example scores pair up. The gain is the mean of the paired differences
(candidate - baseline); a paired bootstrap (resampling examples, not scores)
gives a confidence interval of it. Every decision reports that interval; with
``params["confidence"]`` set the gate also requires its lower bound to exceed
``min_gain``, so a lucky win on a handful of examples is refused.

Pure Python and dspy-free, deterministic for a seed: the decide stage calls it,
and tests check the math without Redis.

Example:
    >>> paired_bootstrap([0, 0, 1, 1], [0, 0, 1, 1])
    (0.0, 0.0)
    >>> g = decide(0.0, 1 / 3, [0, 0, 0], [1, 0, 0], min_gain=0.0, confidence=0.95)
    >>> g.passed, g.gain_ci
    (False, (0.0, 1.0))
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_CONFIDENCE", "DEFAULT_RESAMPLES", "GateDecision", "decide", "paired_bootstrap"]

#: The level of the interval a decision reports when the run does not require one.
DEFAULT_CONFIDENCE = 0.95
#: Bootstrap resamples: the interval's ends move by well under a percent of its width between seeds.
DEFAULT_RESAMPLES = 2000


def paired_bootstrap(baseline: Sequence[float], candidate: Sequence[float], *,
                     confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean paired gain ``candidate[i] - baseline[i]``.

    Args:
        baseline: per-example scores of the baseline.
        candidate: per-example scores of the candidate on the same examples, in the same order.
        confidence: the interval's level, in (0, 1).
        resamples: bootstrap resamples (each draws as many examples as there are, with replacement).
        seed: the resampling seed: the same inputs and seed give the same interval.

    Returns:
        ``(low, high)``; ``(d, d)`` when every example's gain is ``d`` (no resample can differ).

    Raises:
        ValueError: the sequences differ in length or are empty, or ``confidence``/``resamples`` are out of range.
    """
    if len(baseline) != len(candidate):
        raise ValueError(f"unpaired scores: {len(baseline)} baseline, {len(candidate)} candidate")
    if not baseline:
        raise ValueError("no examples to resample")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} is not in (0, 1)")
    if resamples < 1:
        raise ValueError(f"resamples {resamples} is not positive")
    diffs = [float(c) - float(b) for b, c in zip(baseline, candidate, strict=True)]
    if all(d == diffs[0] for d in diffs):
        return diffs[0], diffs[0]
    n, rng = len(diffs), random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[min(resamples - 1, max(0, math.floor(tail * resamples)))]
    high = means[max(0, min(resamples - 1, math.ceil((1 - tail) * resamples) - 1))]
    return low, high


def _pct(confidence: float) -> str:
    return f"{confidence * 100:g}%"


@dataclass(frozen=True)
class GateDecision:
    """What the gate found: whether the candidate passes, its gain and the gain's interval.

    ``passed`` is the gate's verdict only; promotion also needs a session (a dry run promotes nothing).
    """

    passed: bool
    gain: float
    gain_ci: tuple[float, float] | None  # None: no paired per-example scores
    confidence: float  # the interval's level (DEFAULT_CONFIDENCE when not required)
    required: bool  # the run set params["confidence"]: the interval must clear min_gain
    n_val: int  # paired validation examples behind the interval
    min_gain: float
    reason: str

    def summary(self) -> dict[str, Any]:
        """The fields a run's summary gets from the gate (JSON)."""
        return {"gain": self.gain, "gain_ci": list(self.gain_ci) if self.gain_ci else None,
                "confidence": self.confidence, "confidence_required": self.required, "n_val": self.n_val,
                "min_gain": self.min_gain}


def decide(baseline_score: float, candidate_score: float, baseline_scores: Sequence[float] | None,
           candidate_scores: Sequence[float] | None, *, min_gain: float, confidence: float | None = None,
           resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> GateDecision:
    """Decide whether a candidate passes: ``gain >= min_gain`` and, when ``confidence`` is set, the interval too.

    Args:
        baseline_score: the baseline's mean score.
        candidate_score: the candidate's mean score.
        baseline_scores: per-example baseline scores (None when unknown: no interval then).
        candidate_scores: per-example candidate scores, paired with ``baseline_scores``.
        min_gain: the least gain that promotes.
        confidence: when set, the interval at this level must lie above ``min_gain`` (its lower bound exceeds it).
        resamples: bootstrap resamples.
        seed: the bootstrap seed (the run's ``params.seed``).
    """
    b, c = baseline_score, candidate_score
    gain = c - b
    level = DEFAULT_CONFIDENCE if confidence is None else confidence
    paired = (baseline_scores is not None and candidate_scores is not None
              and len(baseline_scores) == len(candidate_scores) > 0)
    ci = paired_bootstrap(baseline_scores or [], candidate_scores or [], confidence=level, resamples=resamples,
                          seed=seed) if paired else None
    n = len(candidate_scores or []) if paired else 0
    interval = f"its {_pct(level)} interval [{ci[0]:.4f}, {ci[1]:.4f}] over {n} examples" if ci else ""
    required = confidence is not None
    if gain < min_gain:
        reason = f"candidate {c:.4f} vs baseline {b:.4f}: gain {gain:.4f} < min_gain {min_gain:g}"
        if required and interval:
            reason += f" ({interval})"
        passed = False
    elif not required:
        reason = f"candidate {c:.4f} beat baseline {b:.4f} by {gain:.4f} >= min_gain {min_gain:g}"
        passed = True
    elif ci is None:
        reason = (f"candidate {c:.4f} vs baseline {b:.4f}: gain {gain:.4f} >= min_gain {min_gain:g}, but no paired "
                  f"per-example scores give the {_pct(level)} interval the run requires")
        passed = False
    elif ci[0] > min_gain:
        reason = (f"candidate {c:.4f} beat baseline {b:.4f} by {gain:.4f}; {interval} lies above "
                  f"min_gain {min_gain:g}")
        passed = True
    else:
        reason = (f"candidate {c:.4f} vs baseline {b:.4f}: gain {gain:.4f} >= min_gain {min_gain:g}, but {interval} "
                  f"does not lie above it (the gain may be noise)")
        passed = False
    return GateDecision(passed=passed, gain=gain, gain_ci=ci, confidence=level, required=required, n_val=n,
                        min_gain=min_gain, reason=reason)
