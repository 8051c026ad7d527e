"""DSPy modules for signatures and programs: ``Predict`` or ``ChainOfThought`` over a signature's
``dspy.Signature``, or a program's own module built by its class or factory.

Kept out of :mod:`dspex_tasks.dsl` so that defining signatures (and the client) never imports dspy.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import dspy

from ..errors import ConfigurationError
from .source import FACTORY_ATTR

if TYPE_CHECKING:  # pragma: no cover
    from ..dsl.signature import Signature

__all__ = ["build_module"]


def build_module(sig: Signature) -> dspy.Module:
    """A fresh module for ``sig``: its program's, or its ``module`` kind (``predict``, ``chain_of_thought``).

    Raises:
        ConfigurationError: a program's factory did not return a ``dspy.Module``.
    """
    if sig.factory is not None:
        module = sig.factory()
        if not isinstance(module, dspy.Module):
            raise ConfigurationError(f"program '{sig.name}' ({sig.origin}) built {type(module).__name__}, "
                                     "not a dspy.Module")
        if sig.predictors is None:
            sig.predictors = tuple(name for name, _ in module.named_predictors())
        if not isinstance(sig.factory, type):
            # A factory function's module may be a bare dspy.Predict or ReAct, whose class says nothing of the
            # program: keep the factory, so MIPROv2's proposer can read its source (programs.source).
            with contextlib.suppress(AttributeError, TypeError):
                setattr(module, FACTORY_ATTR, sig.factory)
        return module
    dsig = sig.to_dspy()
    if sig.module == "chain_of_thought":
        return dspy.ChainOfThought(dsig)
    return dspy.Predict(dsig)
