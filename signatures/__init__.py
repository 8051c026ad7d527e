"""Reference signatures, registered on import so workers serve them (without importing dspy).

The reference programs are in ``signatures.programs`` (``rag``, ``multihop``, ``agent``, ``best_answer``,
``extract``): DSPy modules, so that package imports dspy. Workers import both by default
(``DSPEX_SIGNATURE_MODULES=signatures,signatures.programs``).

Example:
    >>> import signatures
    >>> signatures.qa.output_fields
    {'answer': 'str', 'confidence': 'confidence_score'}
"""

from __future__ import annotations

from dspex_tasks import Signature

from .analysis import complex_analysis
from .classify import classify
from .qa import qa
from .summarize import summarize

__all__ = ["qa", "complex_analysis", "classify", "summarize", "ALL", "by_name"]

ALL: tuple[Signature, ...] = (qa, complex_analysis, classify, summarize)


def by_name() -> dict[str, Signature]:
    """The reference signatures keyed by their registered name."""
    return {sig.name: sig for sig in ALL}
