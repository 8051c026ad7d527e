"""Programs: any ``dspy.Module`` served as a typed task, next to DSL signatures in one registry.

``@program("rag", interface="question -> response")`` on a ``dspy.Module`` subclass (built with no
arguments on each worker) or on a zero-argument factory registers a program. Its interface, a DSL spec or
a ``dspy.Signature`` class, gives the validation and the JSON schemas exactly as a signature's do; the
worker builds the module from code (never from a message or stored state), loads a session's state into
it, calls it with the validated inputs and takes the interface's output fields from the returned
``dspy.Prediction``. The decorated object is returned unchanged, so it still runs in process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ..dsl.signature import Signature, SignatureRegistry, check_name, parse_spec
from ..dsl.signature import registry as default_registry
from ..dsl.types import TypeNode, from_annotation
from ..errors import SignatureError

__all__ = ["program", "interface_fields", "predictor_names"]

T = TypeVar("T")


def program(name: str, *, interface: Any, instructions: str | None = None, desc: str | None = None,
            register: bool = True, registry: SignatureRegistry | None = None, **options: Any) -> Callable[[T], T]:
    """Register a ``dspy.Module`` subclass or zero-argument factory as the program ``name`` (task ``dspex.<name>``).

    Args:
        name: The program's name; programs and signatures share one namespace.
        interface: ``"question -> answer"`` (the DSL; untyped fields are ``str``, as in DSPy) or a
            ``dspy.Signature`` class, whose typed fields (pydantic models, ``list[Model]``, ``Literal``,
            optional) give the validation and the JSON schemas.
        instructions: What the interface says the program does (schemas, docs); defaults to the class's.
        desc: A longer description for schemas and docs.
        register: Add it to ``registry`` (default: the process-wide one, so workers serve it).
        registry: Another registry to add it to (tests).
        **options: Per-program settings, as for a signature: ``lm=``, ``rate_limit=``, ``cache=``.

    Raises:
        SignatureError: a bad name or interface, a name taken by a signature or another program, or an
            object that is neither a ``dspy.Module`` subclass nor a factory callable without arguments.

    Example:
        >>> @program("rag", interface="question -> response")  # doctest: +SKIP
        ... class RAG(dspy.Module): ...
    """
    check_name(name, "program")

    def decorate(obj: T) -> T:
        _check_factory(name, obj)
        inputs, outputs, from_class, cls = interface_fields(interface, name)
        sig = Signature(name, inputs, outputs, instructions=instructions if instructions is not None else from_class,
                        module="program", desc=desc, options=options, kind="program", factory=obj, interface=cls,
                        origin=f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}")
        if register:
            (registry if registry is not None else default_registry).add(sig)
        return obj

    return decorate


def _check_factory(name: str, obj: Any) -> None:
    if inspect.isclass(obj):
        import dspy

        if not issubclass(obj, dspy.Module):
            raise SignatureError(f"program '{name}': {obj.__qualname__} is not a dspy.Module subclass")
        params = inspect.signature(obj.__init__).parameters.values()
    elif callable(obj):
        params = inspect.signature(obj).parameters.values()
    else:
        raise SignatureError(f"program '{name}': expected a dspy.Module subclass or a factory, got {obj!r}")
    required = [p.name for p in params if p.name != "self" and p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise SignatureError(f"program '{name}': workers build it with no arguments, but it requires "
                             f"{', '.join(required)}; give them defaults or register a factory")


def interface_fields(interface: Any, name: str) -> tuple[dict[str, TypeNode], dict[str, TypeNode], str, Any]:
    """(inputs, outputs, instructions, the ``dspy.Signature`` class or None) of a DSL spec or a class."""
    if isinstance(interface, str):
        inputs, outputs = parse_spec(interface)
        return inputs, outputs, "", None
    fields_in = getattr(interface, "input_fields", None)
    fields_out = getattr(interface, "output_fields", None)
    if not inspect.isclass(interface) or not isinstance(fields_in, dict) or not isinstance(fields_out, dict):
        raise SignatureError(f"program '{name}': interface must be a spec like 'question -> answer' or a "
                             f"dspy.Signature class, got {interface!r}")
    if not fields_out:
        raise SignatureError(f"program '{name}': interface {interface.__name__} has no output fields")
    inputs = {field: from_annotation(info.annotation) for field, info in fields_in.items()}
    outputs = {field: from_annotation(info.annotation) for field, info in fields_out.items()}
    return inputs, outputs, str(getattr(interface, "instructions", "") or ""), interface


def predictor_names(module: Any) -> tuple[str, ...]:
    """The names of a built module's predictors (DSPy's ``named_predictors()``), as a state names them."""
    return tuple(name for name, _ in module.named_predictors())
