"""The DSL's type system: a small AST, a parser for both spellings, and its renderings.

A type is parsed once from text into a :class:`TypeNode` by a recursive-descent
parser that resolves names from a table (never ``eval``). The node renders to
the normalized Python spelling, to a pydantic type and to a JSON Schema.

Both spellings are accepted at every level, so ``list[str]``,
``{:list, :string}`` and even ``list[:string]`` are the same type.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

import pydantic
from pydantic import BeforeValidator, ConfigDict, Field, JsonValue

from ..errors import SignatureError

__all__ = ["TypeNode", "parse_type", "from_annotation", "SCALARS", "Entity"]

# name -> canonical kind. Python spelling first, then DSPex's ``:atom`` spelling.
SCALARS: dict[str, str] = {
    "str": "str",
    "int": "int",
    "float": "float",
    "bool": "bool",
    "any": "any",
    "dict": "dict",
    "embedding": "embedding",
    "confidence_score": "confidence_score",
    "probability": "confidence_score",
    "reasoning_chain": "reasoning_chain",
    "entity": "entity",
    "list": "list",
}
DSPEX_SCALARS: dict[str, str] = {
    ":string": "str",
    ":integer": "int",
    ":float": "float",
    ":boolean": "bool",
    ":any": "any",
    ":map": "dict",
    ":atom": "str",
    ":embedding": "embedding",
    ":confidence_score": "confidence_score",
    ":probability": "confidence_score",
    ":reasoning_chain": "reasoning_chain",
    ":entity": "entity",
}
# Composite constructors, Python spelling (``name[...]``) and DSPex spelling (``{:name, ...}``).
COMPOSITES = {"list", "dict", "optional", "literal", "union"}

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<name>:?[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[\[\]{},|])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class TypeNode:
    """One node of a parsed type.

    ``kind`` is a canonical name (``str``, ``list``, ``union`` ...); ``args`` holds
    child nodes, or for ``literal`` the allowed string values. Kind ``python`` is a
    Python annotation the DSL has no name for (a pydantic model, ``list[Model]`` ...),
    from a ``dspy.Signature`` class: ``args`` is ``(annotation, its display name)``,
    and pydantic validates it and gives its JSON Schema.
    """

    kind: str
    args: tuple[Any, ...] = ()

    # -- renderings -------------------------------------------------------
    def normalized(self) -> str:
        """The canonical Python spelling, e.g. ``list[dict[str, entity]]``."""
        k, a = self.kind, self.args
        if k == "literal":
            return "literal[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in a) + "]"
        if k == "list":
            return f"list[{a[0].normalized()}]"
        if k == "dict" and a:
            return f"dict[{a[0].normalized()}, {a[1].normalized()}]"
        if k == "optional":
            return f"optional[{a[0].normalized()}]"
        if k == "union":
            return " | ".join(n.normalized() for n in a)
        if k == "python":
            return str(a[1])
        return k

    @property
    def nullable(self) -> bool:
        if self.kind == "python":
            return _admits_none(self.args[0])
        return self.kind == "optional" or self.kind == "any" or (
            self.kind == "union" and any(n.nullable for n in self.args)
        )

    def python_type(self, *, plain: bool = False) -> Any:
        """The pydantic-ready Python annotation for this type.

        ``plain`` gives the annotation DSPy shows in prompts (``int``, ``Any``)
        without our validators.
        """
        k, a = self.kind, self.args
        if k == "python":
            return a[0]
        if plain and k in ("int", "float", "any"):
            return {"int": int, "float": float, "any": Any}[k]
        if plain and k == "dict" and not a:
            return dict[str, Any]
        simple: dict[str, Any] = {
            "str": str,
            "int": Annotated[int, BeforeValidator(_no_bool)],
            "float": Annotated[float, BeforeValidator(_no_bool)],
            "bool": bool,
            "any": JsonValue,
            "embedding": list[float],
            "confidence_score": Annotated[float, BeforeValidator(_no_bool), Field(ge=0.0, le=1.0)],
            "reasoning_chain": list[str],
            "entity": Entity,
        }
        if k in simple:
            return simple[k]
        if k == "dict":
            if not a:
                return dict[str, JsonValue]
            return dict[a[0].python_type(plain=plain), a[1].python_type(plain=plain)]  # type: ignore[misc]
        if k == "list":
            return list[a[0].python_type(plain=plain)]  # type: ignore[misc]
        if k == "literal":
            return Literal[a]
        if k == "optional":
            return Optional[a[0].python_type(plain=plain)]  # noqa: UP045 - built at run time
        if k == "union":
            return Union[tuple(n.python_type(plain=plain) for n in a)]  # noqa: UP007
        raise AssertionError(f"unhandled kind {k}")  # pragma: no cover

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema (2020-12) of a value of this type, without titles; a ``python`` type may carry
        ``$defs`` (its models), which :func:`~dspex_tasks.dsl.schemas.object_schema` hoists to the root."""
        k, a = self.kind, self.args
        if k == "python":
            schema: dict[str, Any] = pydantic.TypeAdapter(a[0]).json_schema(ref_template="#/$defs/{model}")
            return schema
        if k == "str":
            return {"type": "string"}
        if k == "int":
            return {"type": "integer"}
        if k == "float":
            return {"type": "number"}
        if k == "bool":
            return {"type": "boolean"}
        if k == "any":
            return {}
        if k == "embedding":
            return {"type": "array", "items": {"type": "number"}}
        if k == "confidence_score":
            return {"type": "number", "minimum": 0, "maximum": 1}
        if k == "reasoning_chain":
            return {"type": "array", "items": {"type": "string"}, "description": "reasoning steps"}
        if k == "entity":
            return _ENTITY_SCHEMA_COPY()
        if k == "literal":
            return {"type": "string", "enum": list(a)}
        if k == "list":
            return {"type": "array", "items": a[0].json_schema()}
        if k == "dict":
            if not a:
                return {"type": "object"}
            schema = {"type": "object", "additionalProperties": a[1].json_schema()}
            if a[0].kind == "literal":
                schema["propertyNames"] = {"enum": list(a[0].args)}
            return schema
        if k == "optional":
            return {"anyOf": [a[0].json_schema(), {"type": "null"}]}
        if k == "union":
            return {"anyOf": [n.json_schema() for n in a]}
        raise AssertionError(f"unhandled kind {k}")  # pragma: no cover


def _admits_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    return any(_admits_none(arg) for arg in typing.get_args(annotation)) if typing.get_origin(annotation) in (
        Union, types.UnionType) else False


_SIMPLE = {str: "str", int: "int", float: "float", bool: "bool", Any: "any", dict: "dict", list: "list"}


def from_annotation(annotation: Any) -> TypeNode:
    """The DSL type of a Python annotation where the DSL has one (``str``, ``list[int]``, ``Literal["a"]``,
    ``Optional[...]``, unions), else a ``python`` node that pydantic validates (models, ``list[Model]`` ...)."""
    if annotation in _SIMPLE:
        kind = _SIMPLE[annotation]
        return TypeNode("list", (TypeNode("any"),)) if kind == "list" else TypeNode(kind)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if origin is list and len(args) == 1:
            inner = from_annotation(args[0])
            if inner.kind != "python":
                return TypeNode("list", (inner,))
        elif origin is dict and len(args) == 2 and args[0] is str:
            value = from_annotation(args[1])
            if value.kind != "python":
                return TypeNode("dict", (TypeNode("str"), value))
        elif origin is Literal and args and all(isinstance(v, str) for v in args):
            return TypeNode("literal", tuple(args))
        elif origin in (Union, types.UnionType):
            members = [from_annotation(a) for a in args if a is not type(None)]
            if members and all(m.kind != "python" for m in members):
                node = make_union(members)
                return make_optional(node) if type(None) in args else node
    except (TypeError, SignatureError):
        pass
    return TypeNode("python", (annotation, _display(annotation)))


def _display(annotation: Any) -> str:
    """``list[Person]``, ``Person | None``: how a ``python`` type reads in specs and errors."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is None:
        return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _display(a) for a in args)
    if origin is Literal:
        return "literal[" + ", ".join(json.dumps(v) if isinstance(v, str) else repr(v) for v in args) + "]"
    name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
    return f"{name}[{', '.join(_display(a) for a in args)}]"


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode reads True as 1; a boolean is never a number here.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


class Entity(pydantic.BaseModel):
    """A named entity: ``{text, type, start?, end?}`` (character offsets)."""

    model_config = ConfigDict(extra="forbid")
    text: str
    type: str
    start: int | None = None
    end: int | None = None


_ENTITY_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string"},
        "type": {"type": "string"},
        "start": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "end": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
    "required": ["text", "type"],
    "additionalProperties": False,
}


def _ENTITY_SCHEMA_COPY() -> dict[str, Any]:  # noqa: N802 - reads as a constant
    schema: dict[str, Any] = json.loads(json.dumps(_ENTITY_SCHEMA))
    return schema


class _Parser:
    """Recursive-descent parser over the tokens of one type expression."""

    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        stripped = text.rstrip()
        while pos < len(stripped):
            m = _TOKEN.match(stripped, pos)
            if not m or m.end() == pos:
                self.fail(f"unexpected character {stripped[pos:].lstrip()[:1]!r}")
            assert m is not None
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, why: str) -> None:
        raise SignatureError(f"malformed type for field '{self.field}': {why} in '{self.text.strip()}'")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            self.fail(f"expected {value!r} but the type ended" if value else "the type ended early")
        assert tok is not None
        if value is not None and tok[1] != value:
            self.fail(f"expected {value!r} but found {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self) -> TypeNode:
        if not self.tokens:
            raise SignatureError(f"field '{self.field}' has an empty type")
        node = self.union()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return node

    def union(self) -> TypeNode:
        members = [self.atom()]
        while (tok := self.peek()) is not None and tok[1] == "|":
            self.take("|")
            members.append(self.atom())
        return make_union(members) if len(members) > 1 else members[0]

    def atom(self) -> TypeNode:
        kind, value, _ = self.take()
        if value == "{":
            return self.dspex_composite()
        if kind != "name":
            self.fail(f"expected a type name but found {value!r}")
        lowered = value.lower()
        bare = lowered.lstrip(":")
        tok = self.peek()
        if not value.startswith(":") and bare in COMPOSITES and tok is not None and tok[1] == "[":
            self.take("[")
            node = self.python_composite(bare)
            self.take("]")
            return node
        if value.startswith(":"):
            if value in DSPEX_SCALARS:
                return TypeNode(DSPEX_SCALARS[value])
            self.unknown(value, list(DSPEX_SCALARS))
        if value in SCALARS:
            if value == "list":
                return TypeNode("list", (TypeNode("any"),))
            return TypeNode(SCALARS[value])
        if lowered in ("string", "integer", "boolean", "map", "number"):
            self.unknown(value, list(SCALARS))
        self.unknown(value, list(SCALARS))
        raise AssertionError  # pragma: no cover

    def unknown(self, value: str, known: list[str]) -> None:
        close = difflib.get_close_matches(value, known, n=1, cutoff=0.5)
        if not close:
            alias = {"string": "str", "integer": "int", "boolean": "bool", "map": "dict", "number": "float"}
            hint = alias.get(value.lower().lstrip(":"))
            close = [hint] if hint else []
        hint = f"; did you mean '{close[0]}'?" if close else f"; known types: {', '.join(sorted(set(known)))}"
        raise SignatureError(f"unknown type '{value}' for field '{self.field}'{hint}")

    def python_composite(self, name: str) -> TypeNode:
        if name == "literal":
            return TypeNode("literal", self.literal_values(end="]"))
        if name == "list":
            return TypeNode("list", (self.union(),))
        if name == "optional":
            return make_optional(self.union())
        if name == "union":
            members = [self.union()]
            while self.peek() is not None and self.peek()[1] == ",":  # type: ignore[index]
                self.take(",")
                members.append(self.union())
            return make_union(members)
        key = self.union()
        self.take(",")
        return make_dict(key, self.union(), self)

    def dspex_composite(self) -> TypeNode:
        kind, value, _ = self.take()
        name = value.lstrip(":").lower()
        if kind != "name" or not value.startswith(":") or name not in COMPOSITES:
            self.fail(f"expected one of :list, :dict, :union, :optional, :literal after '{{' but found {value!r}")
        self.take(",")
        if name == "list":
            node = TypeNode("list", (self.union(),))
        elif name == "optional":
            node = make_optional(self.union())
        elif name == "dict":
            key = self.union()
            self.take(",")
            node = make_dict(key, self.union(), self)
        elif name == "literal":
            self.take("[")
            node = TypeNode("literal", self.literal_values(end="]"))
            self.take("]")
        else:
            self.take("[")
            members = [self.union()]
            while self.peek() is not None and self.peek()[1] == ",":  # type: ignore[index]
                self.take(",")
                members.append(self.union())
            self.take("]")
            node = make_union(members)
        self.take("}")
        return node

    def decode_string(self, token: str) -> str:
        """A quoted literal value, with JSON's escapes (single quotes allowed too)."""
        body = token[1:-1]
        if token[0] == "'":
            body = re.sub(r'(\\*)"', lambda m: m.group(1) + ("\\" if len(m.group(1)) % 2 == 0 else "") + '"',
                          body.replace("\\'", "'"))
        try:
            value = json.loads(f'"{body}"')
            value.encode("utf-8")
        except (ValueError, UnicodeEncodeError) as exc:
            self.fail(f"bad escape in literal value {token} ({exc.__class__.__name__})")
        return str(value)

    def literal_values(self, *, end: str) -> tuple[str, ...]:
        values: list[str] = []
        while True:
            kind, value, _ = self.take()
            if kind != "str":
                self.fail(f"literal values must be quoted strings, found {value!r}")
            decoded = self.decode_string(value)
            if decoded in values:
                self.fail(f"literal value {decoded!r} is repeated")
            values.append(decoded)
            tok = self.peek()
            if tok is not None and tok[1] == ",":
                self.take(",")
                continue
            if tok is None or tok[1] != end:
                self.fail(f"expected ',' or '{end}' after a literal value")
            return tuple(values)


def make_union(members: list[TypeNode]) -> TypeNode:
    """Flatten nested unions, drop repeats; any optional member makes ``optional[T | U]``.

    So ``optional[str] | int``, ``str | optional[int]`` and ``optional[str | int]`` are one type.
    """
    flat: list[TypeNode] = []
    nullable = False
    for m in members:
        if m.kind == "optional":
            nullable = True
            m = m.args[0]
        for n in m.args if m.kind == "union" else (m,):
            if n.kind == "optional":
                nullable, n = True, n.args[0]
            if n not in flat:
                flat.append(n)
    node = flat[0] if len(flat) == 1 else TypeNode("union", tuple(flat))
    return TypeNode("optional", (node,)) if nullable else node


def make_optional(inner: TypeNode) -> TypeNode:
    return make_union([TypeNode("optional", (inner,))])


def make_dict(key: TypeNode, value: TypeNode, parser: _Parser) -> TypeNode:
    if key.kind not in ("str", "literal"):
        parser.fail(f"dict keys must be str or a literal of strings (JSON object keys), not '{key.normalized()}'")
    return TypeNode("dict", (key, value))


def parse_type(text: str, *, field: str = "?") -> TypeNode:
    """Parse one type expression in either spelling.

    Raises:
        SignatureError: naming ``field`` and quoting ``text`` when it does not parse.

    Example:
        >>> parse_type("{:list, :string}").normalized()
        'list[str]'
    """
    return _Parser(text, field).parse()
