"""Signatures: the compact DSL, validation models and schemas.

``signature("question: str -> answer: str", name="qa")`` (or DSPy's untyped
``"question -> answer"``: a field without a type is ``str``) parses the spec once,
builds the pydantic models for inputs and outputs once, and registers the
signature by name so workers can turn it into the Celery task ``dspex.qa``.
"""

from __future__ import annotations

import keyword
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pydantic
from pydantic import ConfigDict, Field, create_model

from .. import wire
from ..errors import SignatureError, UnknownSignature, ValidationError
from . import schemas
from .types import TypeNode, parse_type

if TYPE_CHECKING:  # pragma: no cover
    import dspy

__all__ = ["Signature", "signature", "registry", "SignatureRegistry", "MODULES", "MODULE_PREDICTORS", "parse_spec"]

MODULES = ("predict", "chain_of_thought")
#: The predictors of each module kind, as DSPy's ``named_predictors()`` names them: a ``Predict`` is its
#: own predictor, ``self``; a ``ChainOfThought`` has one, ``predict`` (a unit test holds this to DSPy).
MODULE_PREDICTORS: dict[str, tuple[str, ...]] = {"predict": ("self",), "chain_of_thought": ("predict",)}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
# Names DSPy's modules take as call arguments, or that a module adds itself.
RESERVED = frozenset({
    "signature", "demos", "config", "lm", "instructions", "completed", "self", "new_signature",
    # attributes of dspy.Signature and pydantic.BaseModel that a field would shadow
    "append", "append_instructions", "construct", "copy", "delete", "dict", "dump_state", "equals", "fields",
    "from_orm", "input_fields", "insert", "json", "load_state", "output_fields", "parse_file", "parse_obj",
    "parse_raw", "prepend", "schema", "schema_json", "update_forward_refs", "validate", "with_instructions",
    "with_updated_fields",
})
_RESERVED_COT = frozenset({"reasoning"})


def _top_level(text: str, end: int | None = None) -> Iterator[int]:
    """Indices of the characters of ``text[:end]`` that stand outside brackets, braces and quotes."""
    depth, quote, i, stop = 0, "", 0, len(text) if end is None else end
    while i < stop:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif depth == 0:
            yield i
        i += 1


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, braces and quotes."""
    parts, start = [], 0
    for i in _top_level(text):
        if i >= start and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
    parts.append(text[start:])
    return parts


def _check_balanced(spec: str) -> None:
    """Reject unclosed or stray brackets and unterminated strings, naming the field they sit in."""
    stack: list[tuple[str, int]] = []
    quote, quote_at, escaped = "", -1, False
    pairs = {"]": "[", "}": "{"}
    for i, c in enumerate(spec):
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote, quote_at = c, i
        elif c in "[{":
            stack.append((c, i))
        elif c in "]}" and (not stack or stack.pop()[0] != pairs[c]):
            where, text = _field_at(spec, i)
            raise SignatureError(f"malformed type for {where}: unexpected '{c}' in '{text}'")
    if quote:
        where, text = _field_at(spec, quote_at)
        raise SignatureError(f"malformed type for {where}: unterminated string in '{text}'")
    if stack:
        bracket, at = stack[0]
        where, text = _field_at(spec, at)
        raise SignatureError(f"malformed type for {where}: unclosed '{bracket}' in '{text}'")


def _field_at(spec: str, pos: int) -> tuple[str, str]:
    """(``field 'name'``, its ``name: type`` text) for the field around ``pos``, for error messages."""
    start = 0
    for i in _top_level(spec, pos):
        if spec[i] == ",":
            start = i + 1
        elif spec.startswith("->", i):
            start = i + 2
    rest = spec[start:]
    stop = rest.find("->", pos - start) if "->" in rest[pos - start:] else len(rest)
    text = rest[:stop].strip()
    name = text.partition(":")[0].strip()
    return (f"field '{name}'" if name.isidentifier() else f"'{text}'"), text


def _parse_fields(text: str, side: str, spec: str) -> dict[str, TypeNode]:
    if not text.strip():
        raise SignatureError(f"signature has no {side} fields: '{spec.strip()}'")
    fields: dict[str, TypeNode] = {}
    for raw in _split_top(text, ","):
        item = raw.strip()
        if not item:
            raise SignatureError(f"empty field in {side} (a stray comma?): '{text.strip()}'")
        # ``name: type``, or DSPy's untyped shorthand ``name``, which is a ``str`` field.
        name, colon, type_text = item.partition(":")
        name = name.strip()
        if not name.isidentifier():
            raise SignatureError(
                f"field name '{name}' is not an identifier in '{item}': expected 'name: type' or 'name' (a str)"
            )
        if keyword.iskeyword(name) or name.startswith(("_", "model_")) or name in RESERVED:
            raise SignatureError(f"field name '{name}' is reserved in '{item}'")
        if name in fields:
            raise SignatureError(f"duplicate field '{name}' in '{text.strip()}'")
        fields[name] = parse_type(type_text if colon else "str", field=name)
    return fields


def _model(name: str, fields: dict[str, TypeNode]) -> type[pydantic.BaseModel]:
    # Fields get positional internal names with the real name as alias, so a
    # field called ``json`` or ``copy`` never shadows a BaseModel attribute.
    definitions: dict[str, Any] = {}
    for i, (fname, node) in enumerate(fields.items()):
        default = None if node.nullable else ...
        definitions[f"f{i}"] = (node.python_type(), Field(default, alias=fname))
    model: type[pydantic.BaseModel] = create_model(
        name, __config__=ConfigDict(extra="forbid", populate_by_name=False), **definitions
    )
    return model


def _data_path(data: Any, loc: tuple[Any, ...], missing: bool) -> str:
    """The error's location as a path into the data, dropping pydantic's union-member tags."""
    path: list[str] = []
    node = data
    for n, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(str(part))
        elif missing and n == len(loc) - 1:
            path.append(str(part))  # a required key that is absent is named by itself
    return ".".join(path)


def _errors(exc: pydantic.ValidationError, data: Any) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for e in exc.errors(include_url=False):
        loc = _data_path(data, e["loc"], e["type"] == "missing")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unexpected field"
        elif e["type"] == "missing":
            msg = "field required"
        item = {"field": loc, "message": msg}
        if item not in out:
            out.append(item)
    return out


class Signature:
    """A typed signature: fields, validation, schemas and its DSPy form.

    Build one with :func:`signature`. Two signatures are equal when their name,
    normalized fields, instructions and module are equal.
    """

    __slots__ = (
        "name",
        "instructions",
        "module",
        "desc",
        "_inputs",
        "_outputs",
        "input_fields",
        "output_fields",
        "_in_model",
        "_out_model",
        "_dspy",
        "_schemas",
        "options",
        "kind",
        "factory",
        "interface",
        "predictors",
        "origin",
    )

    def __init__(
        self,
        name: str,
        inputs: dict[str, TypeNode],
        outputs: dict[str, TypeNode],
        *,
        instructions: str | None,
        module: str,
        desc: str | None,
        options: dict[str, Any] | None = None,
        kind: str = "signature",
        factory: Any = None,
        interface: Any = None,
        origin: str | None = None,
    ) -> None:
        self.name = name
        #: ``"signature"`` (a DSL spec served by ``module``) or ``"program"`` (a ``dspy.Module`` from ``factory``)
        self.kind = kind
        #: A program's ``dspy.Module`` subclass or zero-argument factory (None for a signature)
        self.factory = factory
        #: A program's ``dspy.Signature`` class interface, if it was given as one
        self.interface = interface
        #: The module's ``named_predictors()`` names, once known (a signature's at once, a program's on a worker)
        self.predictors: tuple[str, ...] | None = MODULE_PREDICTORS.get(module) if kind == "signature" else None
        #: Where it was defined (``module:qualname``), so two programs cannot take one name
        self.origin = origin
        self.instructions = instructions or ""
        self.module = module
        self.desc = desc
        self._inputs = inputs
        self._outputs = outputs
        self.input_fields = {k: v.normalized() for k, v in inputs.items()}
        self.output_fields = {k: v.normalized() for k, v in outputs.items()}
        self._in_model = _model(f"{name}_inputs", inputs)
        self._out_model = _model(f"{name}_outputs", outputs)
        self._dspy: type[dspy.Signature] | None = None
        self._schemas: dict[str, Any] = {}
        self.options = dict(options or {})

    # -- identity -----------------------------------------------------------
    @property
    def spec(self) -> str:
        """The normalized spec; parsing it again gives an equal signature."""
        ins = ", ".join(f"{k}: {v}" for k, v in self.input_fields.items())
        outs = ", ".join(f"{k}: {v}" for k, v in self.output_fields.items())
        return f"{ins} -> {outs}"

    def _key(self) -> tuple[Any, ...]:
        return (self.name, tuple(self.input_fields.items()), tuple(self.output_fields.items()),
                self.instructions, self.module, self.kind, self.origin)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signature) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if self.kind == "program":
            return f"Program({self.name!r}, {self.spec!r}, factory={self.origin!r})"
        return f"Signature({self.name!r}, {self.spec!r}, module={self.module!r})"

    @property
    def input_types(self) -> dict[str, TypeNode]:
        return dict(self._inputs)

    @property
    def output_types(self) -> dict[str, TypeNode]:
        return dict(self._outputs)

    # -- validation ---------------------------------------------------------
    def validate_inputs(self, data: Any) -> dict[str, Any]:
        """Validate inputs strictly (JSON types must match; an int is accepted for a float).

        Raises:
            ValidationError: listing every bad field with its path.
        """
        return self._validate(self._in_model, data, strict=True, what=f"inputs for '{self.name}'")

    def validate_outputs(self, data: Any) -> dict[str, Any]:
        """Validate outputs leniently: LM text such as ``"0.9"`` or ``"true"`` is coerced."""
        return self._validate(self._out_model, data, strict=False, what=f"outputs of '{self.name}'")

    def _validate(self, model: type[pydantic.BaseModel], data: Any, *, strict: bool, what: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ValidationError.from_errors(what, [{"field": "", "message": f"expected an object, got {type(data).__name__}"}])
        try:
            obj = model.model_validate(data, strict=strict)
        except pydantic.ValidationError as exc:
            raise ValidationError.from_errors(what, _errors(exc, data)) from None
        return obj.model_dump(mode="json", by_alias=True)

    # -- schemas ------------------------------------------------------------
    def input_schema(self) -> dict[str, Any]:
        """JSON Schema 2020-12 of the inputs object."""
        return self._cached("input", lambda: schemas.object_schema(f"{self.name}_inputs", self._inputs, self.desc))

    def output_schema(self) -> dict[str, Any]:
        """JSON Schema 2020-12 of the outputs object."""
        return self._cached("output", lambda: schemas.object_schema(f"{self.name}_outputs", self._outputs, self.desc))

    def json_schema(self, target: str = "generic") -> dict[str, Any]:
        """The output schema in a provider's form: ``generic``, ``openai`` or ``anthropic``."""
        if target == "generic":
            return self.output_schema()
        if target == "openai":
            return self._cached("openai", lambda: schemas.openai_response_format(self.name, self.output_schema()))
        if target == "anthropic":
            description = self.desc or self.instructions or f"Return the outputs of {self.name}."
            return self._cached(
                "anthropic", lambda: schemas.anthropic_tool(self.name, description, self.output_schema())
            )
        raise ValueError(f"unknown schema target {target!r}; expected 'generic', 'openai' or 'anthropic'")

    def _cached(self, key: str, build: Any) -> dict[str, Any]:
        if key not in self._schemas:
            self._schemas[key] = build()
        return schemas.copy(self._schemas[key])

    def describe(self) -> dict[str, Any]:
        """What workers publish for clients: schemas, fields and module (JSON)."""
        described: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "spec": self.spec,
            "module": self.module,
            "instructions": self.instructions,
            "input_fields": self.input_fields,
            "output_fields": self.output_fields,
            "input_schema": self.input_schema(),
            "output_schema": self.output_schema(),
        }
        if self.predictors is not None:
            described["predictors"] = list(self.predictors)
        return described

    # -- DSPy ---------------------------------------------------------------
    def to_dspy(self) -> type[dspy.Signature]:
        """A real ``dspy.Signature`` subclass with typed fields and the instructions."""
        if self._dspy is None and self.interface is not None:  # a program's own dspy.Signature class
            cls = self.interface
            self._dspy = cls.with_instructions(self.instructions) if self.instructions != cls.instructions else cls
        if self._dspy is None:
            from .dspy_signature import build_dspy_signature

            self._dspy = build_dspy_signature(self.name, self._inputs, self._outputs, self.instructions)
        return self._dspy

    @property
    def task(self) -> Any:
        """The Celery task ``dspex.<name>`` once a worker app in this process registered it, else None."""
        from celery import current_app

        return current_app.tasks.get(wire.task_name(self.name))


class SignatureRegistry:
    """Signatures by name. Re-defining a name replaces it (module reloads, tests)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Signature] = {}
        self._lock = threading.Lock()

    def add(self, sig: Signature) -> None:
        """Add ``sig``; the same definition again (a module reload) replaces it.

        Raises:
            SignatureError: a program and a signature, or two programs defined in different places,
                would share the name (and so the task ``dspex.<name>``).
        """
        with self._lock:
            old = self._by_name.get(sig.name)
            if old is not None and "program" in (old.kind, sig.kind) and (old.kind, old.origin) != (sig.kind, sig.origin):
                where = f"program {old.origin}" if old.kind == "program" else "a signature"
                raise SignatureError(f"name '{sig.name}' is already taken by {where}: programs and signatures "
                                     "share one namespace (the task is dspex.<name>); pick another name")
            self._by_name[sig.name] = sig

    def get(self, name: str) -> Signature:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise UnknownSignature(f"unknown signature '{name}' (registered: {known})") from None

    def find(self, name: str) -> Signature | None:
        return self._by_name.get(name)

    def remove(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self) -> Iterator[Signature]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


registry = SignatureRegistry()


def signature(
    spec: str,
    *,
    name: str,
    instructions: str | None = None,
    module: str = "predict",
    desc: str | None = None,
    register: bool = True,
    **options: Any,
) -> Signature:
    """Define a typed signature from the compact DSL.

    Args:
        spec: ``"inputs -> outputs"``, each a comma-separated list of ``field: type``
            in Python (``list[str]``) or DSPex (``{:list, :string}``) spelling; a bare ``field``
            is a ``str`` field, as in DSPy (``"question -> answer"``).
        name: The signature's name; its task is ``dspex.<name>``.
        instructions: The task description the LM sees.
        module: ``"predict"`` or ``"chain_of_thought"``.
        desc: A longer description for schemas and docs.
        register: Add it to the process-wide registry (default) so workers serve it.
        **options: Per-signature settings, e.g. ``lm="openai/gpt-4o-mini"``.

    Raises:
        SignatureError: naming the field and quoting the offending text.

    Example:
        >>> qa = signature("question: str -> answer: str, confidence: confidence_score", name="qa")
        >>> qa.output_fields["confidence"]
        'confidence_score'
    """
    check_name(name)
    if module not in MODULES:
        raise SignatureError(f"unknown module {module!r} for signature '{name}'; expected one of {', '.join(MODULES)}")
    inputs, outputs = parse_spec(spec, module=module)
    sig = Signature(name, inputs, outputs, instructions=instructions, module=module, desc=desc, options=options)
    if register:
        registry.add(sig)
    return sig


def check_name(name: Any, what: str = "signature") -> str:
    """``name`` if it can name a task, else :class:`SignatureError`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SignatureError(f"{what} name {name!r} must be 1-64 chars of [A-Za-z0-9_.-], starting with a letter")
    wire.check_program_name(name)
    return name


def parse_spec(spec: str, *, module: str = "predict") -> tuple[dict[str, TypeNode], dict[str, TypeNode]]:
    """``"inputs -> outputs"`` parsed into (inputs, outputs), each field name -> type.

    Raises:
        SignatureError: naming the field and quoting the offending text.
    """
    if not isinstance(spec, str):
        raise SignatureError(f"expected a spec string like 'question -> answer', got {type(spec).__name__}")
    _check_balanced(spec)
    sides = _split_top(spec, "->")
    if len(sides) < 2:
        raise SignatureError(f"missing '->' between inputs and outputs in '{spec.strip()}'")
    if len(sides) > 2:
        raise SignatureError(f"more than one '->' in '{spec.strip()}'")
    inputs = _parse_fields(sides[0], "input", spec)
    outputs = _parse_fields(sides[1], "output", spec)
    for fname in outputs:
        if fname in inputs:
            raise SignatureError(f"duplicate field '{fname}': it is both an input and an output in '{spec.strip()}'")
        if module == "chain_of_thought" and fname in _RESERVED_COT:
            raise SignatureError(f"field name '{fname}' is reserved for chain_of_thought in '{spec.strip()}'")
    if module == "chain_of_thought":
        for fname in inputs:
            if fname in _RESERVED_COT:
                raise SignatureError(f"field name '{fname}' is reserved for chain_of_thought in '{spec.strip()}'")
    return inputs, outputs
