"""DSPy modules for signatures: ``Predict`` or ``ChainOfThought`` over the signature's ``dspy.Signature``.

Kept out of :mod:`dspex_tasks.dsl` so that defining signatures (and the client) never imports dspy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dspy

if TYPE_CHECKING:  # pragma: no cover
    from ..dsl.signature import Signature

__all__ = ["build_module"]


def build_module(sig: Signature) -> dspy.Module:
    """A fresh module for ``sig`` (its ``module`` kind: ``predict`` or ``chain_of_thought``)."""
    dsig = sig.to_dspy()
    if sig.module == "chain_of_thought":
        return dspy.ChainOfThought(dsig)
    return dspy.Predict(dsig)
