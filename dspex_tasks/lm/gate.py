"""The gate every LM call of a job passes first: how a cancelled or timed-out job stops before its next call.

The worker puts the job's check into the job's DSPy context under :data:`GATE_KEY` (DSPy carries its context
into the threads of ``dspy.Parallel`` and the optimizers, which a ContextVar would not reach); the governed LM
and the mock LM call :func:`pass_gate` before they do anything else. A job with no gate pays one dictionary
lookup per call, and none of DSPy's callback machinery.
"""

from __future__ import annotations

import sys

__all__ = ["GATE_KEY", "pass_gate"]

#: The key of the job's check in ``dspy.context``: a callable that raises when the job must stop.
GATE_KEY = "dspex_gate"


def pass_gate() -> None:
    """Call the running job's check, if any (it raises to stop the job)."""
    dspy = sys.modules.get("dspy")
    if dspy is None:
        return
    gate = dspy.settings.get(GATE_KEY)
    if gate is not None:
        gate()
