"""dspex-tasks: DSPy programs as typed, durable background jobs on Celery and Redis.

The public contract::

    from dspex_tasks import signature, program, Signature, Client, errors

Nothing here connects to anything or imports dspy at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .dsl.signature import Signature, registry, signature

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client, Job, Result
    from .programs.program import program
    from .programs.store import MemoryProgramStore, ProgramRecord, ProgramStore
    from .testing.mock_lm import MockLM

__all__ = [
    # signatures
    "signature",
    "program",
    "Signature",
    "registry",
    # client
    "Client",
    "Job",
    "Result",
    # program store
    "ProgramStore",
    "MemoryProgramStore",
    "ProgramRecord",
    # optimization: register a metric by name
    "metric",
    # testing
    "MockLM",
    # errors
    "errors",
]

_LAZY = {
    "program": "programs.program",
    "Client": "client",
    "Job": "client",
    "Result": "client",
    "ProgramStore": "programs.store",
    "MemoryProgramStore": "programs.store",
    "ProgramRecord": "programs.store",
    "metric": "optimize.metrics",
    "MockLM": "testing.mock_lm",
}


def __getattr__(name: str) -> Any:
    # Lazy so that ``import dspex_tasks`` stays cheap and dspy-free.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dspex_tasks' has no attribute {name!r}")
