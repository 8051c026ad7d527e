"""The source of a program as DSPy's program-aware instruction proposers read it (MIPROv2's ``GroundedProposer``).

DSPy's ``get_dspy_source_code`` reads a module's class with ``inspect.getsource`` and falls back quietly:
a class whose source a worker cannot read (shipped as ``.pyc`` only, generated, or exec'd) makes the proposer
drop its program-aware step (a line on stdout says so), and a module a factory returns as a bare
``dspy.Predict`` comes back as an empty string, so the proposer describes nothing. :func:`program_source` keeps DSPy's text when it holds the
program's own class and otherwise adds what the worker does know: the factory's source when it can be read,
and an outline of the module's predictors, their signatures and instructions.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

__all__ = ["program_source", "outline", "FACTORY_ATTR"]

log = logging.getLogger(__name__)

#: The attribute :func:`dspex_tasks.programs.bridge.build_module` sets on a module a factory function built.
FACTORY_ATTR = "_dspex_factory"


def _dspy_text(module: Any) -> str:
    from dspy.propose.utils import get_dspy_source_code

    try:
        return str(get_dspy_source_code(module)).strip()
    except Exception as exc:  # noqa: BLE001 - DSPy's own failure is the case this module exists for
        log.debug("dspy could not read the source of %s: %s", type(module).__qualname__, exc)
        return ""


def _source_of(obj: Any) -> str | None:
    try:
        return inspect.getsource(obj).rstrip()
    except (OSError, TypeError):
        return None


def _is_dspy(cls: type) -> bool:
    return (cls.__module__ or "").split(".", 1)[0] == "dspy"


def outline(module: Any) -> str:
    """Pseudo-code of a built module: its class (or DSPy module kind) and each predictor's signature and
    instructions, which is all a worker knows of a program whose source it cannot read."""
    cls = type(module)
    predictors = list(module.named_predictors())
    if _is_dspy(cls):  # a library module a factory returned (or a signature's): its predictors, by name
        lines = [f"# outline of the built module, a dspy.{cls.__name__}"]
        if not any(name == "self" for name, _ in predictors):
            lines.append(f"program = dspy.{cls.__name__}(...)")
        target, indent = "program", ""
    else:
        lines = [f"class {cls.__name__}(dspy.Module):  # outline of the built module: its source is not available"]
        target, indent = "self", "    "
    for name, predictor in predictors:
        sig = predictor.signature
        fields = f"{', '.join(sig.input_fields)} -> {', '.join(sig.output_fields)}"
        lhs = target if name == "self" else f"{target}.{name}"
        lines.append(f'{indent}{lhs} = dspy.{type(predictor).__name__}("{fields}")')
        if sig.instructions:
            lines.append(f"{indent}# instructions: " + " ".join(str(sig.instructions).split()))
    return "\n".join(lines)


def program_source(module: Any) -> str:
    """The text a program-aware proposer should read as ``module``'s code.

    DSPy's own text when it holds the module's class source (a class the worker imported from a file);
    otherwise the factory's source (when :func:`~dspex_tasks.programs.bridge.build_module` built it from
    one that can be read), DSPy's text (signatures, library classes) and :func:`outline`. A missing class
    source is logged as a warning naming the class or factory.
    """
    cls = type(module)
    text = _dspy_text(module)
    if not _is_dspy(cls) and f"class {cls.__name__}" in text:
        return text
    parts: list[str] = []
    factory = getattr(module, FACTORY_ATTR, None)
    made_by = _source_of(factory) if factory is not None else None
    if made_by:
        parts.append(f"# the program's module is built by this factory\n{made_by}")
    elif factory is not None or not _is_dspy(cls):  # a program's own code, unreadable: say so (once per compile)
        where = factory if factory is not None else cls
        log.warning("no source for the program %s.%s on this worker (generated, or its file is not readable "
                    "here): the instruction proposer reads an outline of its predictors instead",
                    getattr(where, "__module__", "?"), getattr(where, "__qualname__", repr(where)))
    if text:
        parts.append(text)
    parts.append(outline(module))
    return "\n\n".join(parts)
