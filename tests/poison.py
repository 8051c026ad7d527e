"""Test-only faults, injected through public registries (loaded via DSPEX_SIGNATURE_MODULES).

- mock scenario ``crash_on_poison``: the worker process dies (SIGKILL) while answering a
  question containing ``POISON``; for ``ONCE:<path>`` it dies only the first time.
- metric ``explodes``: raises for an example whose question contains ``BOOM``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from dspex_tasks.optimize.metrics import exact_match, metric
from dspex_tasks.testing import mockgen


def crash_on_poison(inputs: dict[str, Any], demos: list[Any]) -> dict[str, Any]:
    question = str(inputs.get("question", ""))
    if "POISON" in question:
        os.kill(os.getpid(), signal.SIGKILL)
    if question.startswith("ONCE:"):
        marker = Path(question.split(":", 1)[1])
        if not marker.exists():
            marker.write_text("died once")
            os.kill(os.getpid(), signal.SIGKILL)
    return {}


mockgen.SCENARIOS["crash_on_poison"] = crash_on_poison


@metric("explodes")
def explodes(example: Any, prediction: Any, trace: Any = None) -> float:
    if "BOOM" in str(example.get("question", "")):
        raise RuntimeError("metric exploded on purpose")
    return exact_match(example, prediction, trace)
