"""Deterministic, type-correct mock answers for DSPy prompts (pure logic, no dspy import).

Shared by :class:`dspex_tasks.testing.mock_lm.MockLM` (in process) and
:mod:`dspex_tasks.testing.mock_server` (over HTTP). Every value is derived from a
blake2b hash of a key built from the seed, the field name and the current
inputs, so the same prompt always gets the same answer, in any process.

``dspy.ReAct`` turns (outputs ``next_thought``, ``next_tool_name``, ``next_tool_args``) get a
short plan instead of random values: one or two calls of tools listed in the prompt's
instructions, with arguments that fit each tool's argument schema, then ``finish``
(see :func:`react_step`).

GEPA's reflection prompts (a new instruction asked for, given the current one and examples with
feedback) get a deterministic new instruction: the current one plus the feedback's distinct lessons
(see :func:`reflect_instruction`); the ``learns_from_instructions`` scenario then follows a rule once
a predictor's instructions state it (:data:`RULE_TEXT`).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..dsl.types import TypeNode

if TYPE_CHECKING:  # pragma: no cover
    from ..dsl.signature import Signature, SignatureRegistry

__all__ = [
    "RULE_TEXT", "Prompt", "Scripted", "answer", "answer_for_schema", "count_tokens", "follow_demos",
    "learns_from_instructions", "message_text", "mock_text", "parse_prompt", "prompt_tokens", "react_step",
    "react_tools", "reflect_instruction", "reflect_step", "value_for",
]

JsonSchema = dict[str, Any]
ScriptFn = Callable[..., Mapping[str, Any]]
#: ``{signature name or "*": outputs dict | callable(inputs[, demos[, instructions]]) -> outputs dict}``
Scripted = Mapping[str, Mapping[str, Any] | ScriptFn]

CHAT, JSON, PLAIN = "chat", "json", "plain"
_JSON_MARKER = "Outputs will be a JSON object with the following fields."
_COMPLETED = "[[ ## completed ## ]]"
_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.MULTILINE)
_OBJECTIVE = "In adhering to this structure, your objective is: "
_DEMO_PREFIX = "This is an example of the task, though some input or output fields are not supplied."
_WORDS = (
    "alpha", "amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
    "kestrel", "lumen", "maple", "nimbus", "onyx", "prism", "quartz", "raven", "sierra", "tundra", "umber",
    "violet", "willow", "xenon", "yarrow", "zephyr", "basalt", "cedar", "dune", "echo", "flint",
)
_ENTITY_TYPES = ("PERSON", "ORG", "LOC", "DATE", "MISC")
_SOFT_DEPTH, _HARD_DEPTH = 8, 40
_PY_CONSTANTS: dict[str, Any] = {"True": True, "False": False, "None": None}


# -- hashing ---------------------------------------------------------------------------------------
def _digest(key: str) -> int:
    data = key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _frac(key: str) -> float:
    """A float in [0, 1) from ``key``."""
    return (_digest(key) >> 11) / 2.0**53


def _pick(items: Sequence[Any], key: str) -> Any:
    return items[_digest(key) % len(items)]


def mock_text(key: str) -> str:
    """Short readable text derived from ``key``, e.g. ``"mock-3fa2c1 cedar onyx"``."""
    h = _digest(key)
    return f"mock-{h & 0xFFFFFF:06x} {_WORDS[(h >> 24) % len(_WORDS)]} {_WORDS[(h >> 40) % len(_WORDS)]}"


# -- values ----------------------------------------------------------------------------------------
def value_for(spec: TypeNode | Mapping[str, Any], key: str) -> Any:
    """A deterministic, type-correct JSON value for a DSL type or a JSON schema.

    Args:
        spec: A :class:`~dspex_tasks.dsl.types.TypeNode` or a JSON schema (``$ref`` into its ``$defs`` is resolved).
        key: The hash key; the same key always gives the same value.

    Returns:
        A JSON-compatible value (str, int, float, bool, None, list or dict).
    """
    schema = spec.json_schema() if isinstance(spec, TypeNode) else dict(spec)
    return _from_schema(schema, key, schema, 0)


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    node: Any = root if ref.startswith("#") else None
    for part in filter(None, ref.lstrip("#").split("/")):
        node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def _deref(schema: Any, root: Mapping[str, Any]) -> Mapping[str, Any]:
    out: Mapping[str, Any] = schema if isinstance(schema, Mapping) else {}
    for _ in range(_HARD_DEPTH):
        if "$ref" not in out:
            break
        out = {**_resolve(str(out["$ref"]), root), **{k: v for k, v in out.items() if k != "$ref"}}
    return out


def _is_null(schema: Any, root: Mapping[str, Any]) -> bool:
    return _deref(schema, root).get("type") == "null"


def _from_schema(schema: Any, key: str, root: Mapping[str, Any], depth: int) -> Any:
    if depth > _HARD_DEPTH:
        raise ValueError("schema nests too deeply to generate a value")
    s = _deref(schema, root)
    if "const" in s:
        return s["const"]
    if isinstance(s.get("enum"), list) and s["enum"]:
        values = [v for v in s["enum"] if v is not None] or s["enum"]
        return _pick(values, key + "|enum")
    for combo in ("anyOf", "oneOf"):
        members = s.get(combo)
        if isinstance(members, list) and members:
            if depth >= _SOFT_DEPTH and any(_is_null(m, root) for m in members):
                return None
            choices = [m for m in members if not _is_null(m, root)] or members
            return _from_schema(_pick(choices, key + "|member"), key, root, depth + 1)
    if isinstance(s.get("allOf"), list):
        parts = [_deref(part, root) for part in s["allOf"]]
        return _from_schema({k: v for part in [s, *parts] for k, v in part.items() if k != "allOf"}, key, root, depth + 1)
    kind = s.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or kind
        kind = _pick(kinds, key + "|type") if kinds else None
    if kind is None:
        kind = "object" if "properties" in s else "array" if "items" in s else "string"
    if kind == "string":
        fmt = s.get("format")
        return _FORMATS[fmt](_digest(key)) if isinstance(fmt, str) and fmt in _FORMATS else mock_text(key)
    if kind == "integer":
        lo = int(s.get("minimum", s["exclusiveMinimum"] + 1 if "exclusiveMinimum" in s else 0))
        hi = int(s.get("maximum", s["exclusiveMaximum"] - 1 if "exclusiveMaximum" in s else lo + 99))
        return lo + _digest(key) % max(hi - lo + 1, 1)
    if kind == "number":
        lo_f = float(s.get("minimum", s.get("exclusiveMinimum", 0.0)))
        hi_f = float(s.get("maximum", s.get("exclusiveMaximum", lo_f + 1.0)))
        value = lo_f + _frac(key) * (hi_f - lo_f)
        rounded = math.floor(value * 10_000) / 10_000
        return rounded if rounded >= lo_f else value
    if kind == "boolean":
        return _digest(key) & 1 == 1
    if kind == "null":
        return None
    if kind == "array":
        return _array(s, key, root, depth)
    if kind == "object":
        return _object(s, key, root, depth)
    return mock_text(key)


def _date(h: int) -> str:
    return f"{1900 + h % 200:04d}-{1 + (h >> 8) % 12:02d}-{1 + (h >> 16) % 28:02d}"


def _time(h: int) -> str:
    return f"{(h >> 24) % 24:02d}:{(h >> 32) % 60:02d}:{(h >> 40) % 60:02d}"


def _uuid(h: int) -> str:
    x = f"{h:016x}{(h * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:016x}"
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-8{x[17:20]}-{x[20:32]}"


#: Values for JSON schema string ``format``s (what pydantic emits for date, datetime, time, UUID, ...).
_FORMATS: dict[str, Callable[[int], str]] = {
    "date": _date,
    "date-time": lambda h: f"{_date(h)}T{_time(h)}Z",
    "time": _time,
    "duration": lambda h: f"PT{h % 86_400}S",
    "email": lambda h: f"mock-{h & 0xFFFFFF:06x}@example.com",
    "uri": lambda h: f"https://example.com/mock-{h & 0xFFFFFF:06x}",
    "uuid": _uuid,
}


def _array(s: Mapping[str, Any], key: str, root: Mapping[str, Any], depth: int) -> list[Any]:
    items = _deref(s.get("items", {}), root)
    if depth >= _SOFT_DEPTH and not s.get("minItems"):
        return []
    h = _digest(key + "|len")
    if items.get("type") == "string" and "reasoning" in str(s.get("description", "")).lower():
        return [f"Step {i + 1}: {mock_text(f'{key}/{i}')}" for i in range(2 + h % 2)]
    n = 4 + h % 5 if items.get("type") == "number" else 1 + h % 3
    n = max(n, int(s.get("minItems", 0)))
    if "maxItems" in s:
        n = min(n, int(s["maxItems"]))
    return [_from_schema(items, f"{key}/{i}", root, depth + 1) for i in range(n)]


def _object(s: Mapping[str, Any], key: str, root: Mapping[str, Any], depth: int) -> dict[str, Any]:
    props = s.get("properties")
    if isinstance(props, Mapping) and props:
        if set(props) == {"text", "type", "start", "end"}:
            text = mock_text(key + ".text")
            start = _digest(key + ".start") % 50
            return {"text": text, "type": _pick(_ENTITY_TYPES, key + ".type"), "start": start, "end": start + len(text)}
        required = set(s.get("required", props))
        return {
            name: _from_schema(sub, f"{key}.{name}", root, depth + 1)
            for name, sub in props.items()
            if depth < _SOFT_DEPTH or name in required
        }
    extra = s.get("additionalProperties", True)
    if extra is False or depth >= _SOFT_DEPTH:
        return {}
    values = extra if isinstance(extra, Mapping) else {"type": "string"}
    n = 1 + _digest(key + "|len") % 2
    names_schema = _deref(s.get("propertyNames", {}), root)
    names = [names_schema["const"]] if "const" in names_schema else names_schema.get("enum")
    if isinstance(names, list) and names:
        start = _digest(key + "|keys")
        keys = [str(names[(start + i) % len(names)]) for i in range(min(n, len(names)))]
    else:
        keys = [f"key_{_digest(f'{key}|k{i}') & 0xFFFF:04x}{i}" for i in range(n)]
    return {k: _from_schema(values, f"{key}[{k}]", root, depth + 1) for k in keys}


# -- prompt parsing --------------------------------------------------------------------------------
@dataclass
class Prompt:
    """What the mock needs from a DSPy-formatted prompt."""

    adapter: str = PLAIN
    system: str = ""
    instructions: str = ""
    input_fields: dict[str, str] = field(default_factory=dict)  # name -> annotation shown in the prompt
    output_fields: dict[str, str] = field(default_factory=dict)
    hints: dict[str, JsonSchema] = field(default_factory=dict)  # output name -> JSON schema
    inputs_text: str = ""  # the last user message without the output reminder (the hash key)
    inputs: dict[str, Any] = field(default_factory=dict)
    demos: list[dict[str, Any]] = field(default_factory=list)


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one OpenAI-style message (``content`` as a str or a list of text parts)."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content)
    return "" if content is None else str(content)


def _field_list(system: str, start: str, end: str) -> dict[str, str]:
    i = system.find(start)
    segment = system[i:].split(end, 1)[0] if i >= 0 else ""
    return {m.group(1): m.group(2) for m in _FIELD_LINE.finditer(segment)}


def _note_schema(note: str) -> JsonSchema:
    note = note.strip()
    marker = "must adhere to the JSON schema: "
    if marker in note:
        try:
            parsed = json.loads(note.split(marker, 1)[1])
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    for kind, text in (("number", "single float value"), ("integer", "single int value"), ("boolean", "True or False")):
        if text in note:
            return {"type": kind}
    if "one of: " in note:
        return {"type": "string", "enum": note.split("one of: ", 1)[1].split("; ")}
    return {"type": "string"}


def _sections(text: str) -> dict[str, str]:
    """``[[ ## name ## ]]`` sections of a message, like ChatAdapter.parse (first occurrence wins)."""
    found: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        if m := _HEADER.match(line.strip()):
            found.append((m.group(1), [line.strip()[m.end() :]]))
        else:
            found[-1][1].append(line)
    out: dict[str, str] = {}
    for name, lines in found[1:]:
        out.setdefault(name, "\n".join(lines).strip())
    return out


def _loads(text: str, schema: Mapping[str, Any] | None = None, annotation: str | None = None) -> Any:
    """A field's text as a value: JSON when it looks like JSON, else the string itself."""
    if annotation == "str" or (schema is not None and _raw_ok(schema)):
        return text
    if text in _PY_CONSTANTS:
        return _PY_CONSTANTS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[text.index("{") :])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _strip_reminder(text: str) -> str:
    i = text.rfind("Respond with ")
    tail = text[i:] if i >= 0 else ""
    if (i == 0 or text[i - 2 : i] == "\n\n") and (_COMPLETED in tail or "order of fields" in tail):
        return text[:i].rstrip()
    return text


def parse_prompt(messages: Sequence[Mapping[str, Any]]) -> Prompt:
    """Read a DSPy ChatAdapter or JSONAdapter prompt: fields, type hints, inputs and demos."""
    p = Prompt()
    p.system = "\n".join(message_text(m) for m in messages if m.get("role") in ("system", "developer"))
    p.adapter = JSON if _JSON_MARKER in p.system else CHAT if _COMPLETED in p.system else PLAIN
    p.input_fields = _field_list(p.system, "Your input fields are:", "Your output fields are:")
    p.output_fields = _field_list(p.system, "Your output fields are:", "All interactions will be structured")
    if _OBJECTIVE in p.system:
        p.instructions = textwrap.dedent(p.system.split(_OBJECTIVE, 1)[1]).strip()
    if p.adapter == JSON:
        block = _json_object(p.system.split(_JSON_MARKER, 1)[1]) or {}
        for name in p.output_fields or block:
            p.hints[name] = _note_schema(str(block.get(name, "")))
    else:
        for name in p.output_fields:
            m = re.search(re.escape(f"[[ ## {name} ## ]]\n{{{name}}}") + r"([^\n]*)", p.system)
            p.hints[name] = _note_schema(m.group(1) if m else "")
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    last = max((i for i, m in enumerate(turns) if m.get("role") == "user"), default=-1)
    if last >= 0:
        p.inputs_text = _strip_reminder(message_text(turns[last]))
        p.inputs = _parse_inputs(p, p.inputs_text)
    for user, reply in zip(turns[:last], turns[1:last], strict=False):
        if user.get("role") == "user" and reply.get("role") == "assistant":
            p.demos.append({**_parse_inputs(p, message_text(user)), **_parse_outputs(p, message_text(reply))})
    return p


def _parse_inputs(p: Prompt, text: str) -> dict[str, Any]:
    sections = _sections(_strip_reminder(text.replace(_DEMO_PREFIX, "", 1)))
    names = p.input_fields or sections
    return {k: _loads(sections[k], annotation=p.input_fields.get(k)) for k in names if k in sections}


def _parse_outputs(p: Prompt, text: str) -> dict[str, Any]:
    if p.adapter == JSON:
        obj = _json_object(text) or {}
        return {k: v for k, v in obj.items() if not p.output_fields or k in p.output_fields}
    sections = _sections(text)
    sections.pop("completed", None)
    return {k: _loads(v, p.hints.get(k)) for k, v in sections.items() if not p.output_fields or k in p.output_fields}


# -- answering -------------------------------------------------------------------------------------
def _category(schema: Mapping[str, Any]) -> Any:
    schema = _deref(schema, schema)
    if "enum" in schema:
        return ("enum", tuple(str(v) for v in schema["enum"]))
    kind = schema.get("type")
    return kind if isinstance(kind, str) else "other"


def match_signature(
    p: Prompt, registry: SignatureRegistry | None = None, scripted: Scripted | None = None
) -> Signature | None:
    """The registered signature whose fields (and, when ambiguous, instructions) match the prompt."""
    if registry is None:
        from ..dsl.signature import registry as default_registry

        registry = default_registry
    outputs = set(p.output_fields)
    best: tuple[int, Signature] | None = None
    for sig in registry:
        wanted = set(sig.output_fields) | ({"reasoning"} if "reasoning" in outputs else set())
        if set(sig.input_fields) != set(p.input_fields) or wanted != outputs:
            continue
        types = sig.output_types
        if any(_category(types[k].json_schema()) != _category(p.hints.get(k, {})) for k in types):
            continue
        said = " ".join(sig.instructions.split())
        score = 2 * bool(said and said in " ".join(p.instructions.split())) + bool(scripted and sig.name in scripted)
        if best is None or score > best[0]:
            best = (score, sig)
    return best[1] if best else None


def _call_script(fn: ScriptFn, inputs: dict[str, Any], demos: list[dict[str, Any]],
                 instructions: str = "") -> Mapping[str, Any]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return fn(dict(inputs))
    positional = [q for q in params if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 or any(q.kind == q.VAR_POSITIONAL for q in params):
        return fn(dict(inputs), [dict(d) for d in demos], instructions)
    if len(positional) == 2:
        return fn(dict(inputs), [dict(d) for d in demos])
    return fn(dict(inputs))


def follow_demos(inputs: Mapping[str, Any], demos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A ``scripted`` callable that answers with the outputs of a demo whose inputs equal ``inputs``."""
    for demo in demos:
        if inputs and all(k in demo and demo[k] == v for k, v in inputs.items()):
            return {k: v for k, v in demo.items() if k not in inputs}
    return {}


def learns_from_demos(inputs: Mapping[str, Any], demos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A scripted behaviour where demos help: with at least one demo in the prompt, every
    text output follows a rule (``rule_answer``) the demos illustrate; without demos the
    usual hash-derived values stand. Optimization tests and demos label data with the rule."""
    if not demos or not inputs:
        return {}
    return {"*text*": rule_answer(inputs)}


def rule_answer(inputs: Mapping[str, Any]) -> str:
    """The rule ``learns_from_demos`` applies: the first input's text, upper-cased and reversed."""
    first = next(iter(inputs.values()))
    return str(first).upper()[::-1]


#: :func:`rule_answer` in words. A predictor whose instructions contain it (spacing aside) follows the rule
#: in the ``learns_from_instructions`` scenario: a metric whose feedback states it lets GEPA win.
RULE_TEXT = "Answer with the first input's text in upper case, reversed."


def _squash(text: str) -> str:
    return " ".join(text.split())


def learns_from_instructions(inputs: Mapping[str, Any], demos: Sequence[Mapping[str, Any]],
                             instructions: str) -> dict[str, Any]:
    """A scripted behaviour where instructions help: once the prompt's instructions state :data:`RULE_TEXT`,
    every text output follows :func:`rule_answer`; otherwise the usual hash-derived values stand."""
    if not inputs or _squash(RULE_TEXT) not in _squash(instructions):
        return {}
    return {"*text*": rule_answer(inputs)}


def learns(inputs: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], instructions: str) -> dict[str, Any]:
    """``learns_from_demos`` and ``learns_from_instructions`` together: demos or stated rules both help."""
    return learns_from_demos(inputs, demos) or learns_from_instructions(inputs, demos, instructions)


# Named behaviours the HTTP server can switch to (scripted callables cannot travel over HTTP).
SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "learns_from_demos": learns_from_demos,
    "learns_from_instructions": learns_from_instructions,
    "learns": learns,
    "follow_demos": follow_demos,
}


# -- GEPA reflection -------------------------------------------------------------------------------
#: dspy's proposer (``dspy.teleprompt.gepa.instruction_proposal.ProposeInstruction``): its fields.
_REFLECT_INPUTS = ("current_instruction", "examples_with_feedback")
_REFLECT_OUTPUT = "new_instruction"
#: gepa's own plain-text template (``InstructionProposalSignature``): the answer goes in a ``` block.
_PLAIN_REFLECT_HEAD = "I provided an assistant with the following instructions to perform a task for me:\n```\n"
_PLAIN_REFLECT_TAIL = "Provide the new instructions within ``` blocks."
_FEEDBACK_HEADING = re.compile(r"^#+ Feedback\s*\n(.*?)(?=^#+ |\Z)", re.MULTILINE | re.DOTALL)
_MAX_LESSONS, _MAX_LESSON_CHARS = 3, 300


def _feedback_texts(examples: Any) -> list[str]:
    """The ``Feedback`` of each reflective example: JSON records (dspy) or markdown sections (gepa)."""
    if isinstance(examples, list):
        return [str(e["Feedback"]) for e in examples if isinstance(e, Mapping) and e.get("Feedback")]
    return [m.group(1) for m in _FEEDBACK_HEADING.finditer(str(examples))]


def reflect_instruction(current: str, feedback: Sequence[str]) -> str:
    """A reflection LM's new instruction: ``current`` plus, as a list, the distinct feedback texts it does not
    already hold (at most three, each cut to 300 characters). Deterministic; no new lesson gives ``current``."""
    base = current.strip()
    lessons: list[str] = []
    for text in feedback:
        lesson = _squash(str(text))[:_MAX_LESSON_CHARS]
        if lesson and lesson not in lessons and lesson not in _squash(base):
            lessons.append(lesson)
    if not lessons:
        return base
    return base + "\n\n" + "\n".join(f"- {lesson}" for lesson in lessons[:_MAX_LESSONS])


def reflect_step(p: Prompt) -> dict[str, str] | None:
    """``new_instruction`` for dspy's GEPA reflection prompt (None for any other prompt)."""
    if _REFLECT_OUTPUT not in p.output_fields or not all(k in p.inputs for k in _REFLECT_INPUTS):
        return None
    current, examples = (p.inputs[k] for k in _REFLECT_INPUTS)
    return {_REFLECT_OUTPUT: reflect_instruction(str(current), _feedback_texts(examples))}


def _plain_reflection(text: str) -> str | None:
    """The reply to gepa's plain reflection template: the new instruction in a ``` block."""
    if not text.startswith(_PLAIN_REFLECT_HEAD) or _PLAIN_REFLECT_TAIL not in text:
        return None
    current, _, rest = text[len(_PLAIN_REFLECT_HEAD):].partition("\n```")
    side = rest.split("```", 2)[1] if rest.count("```") >= 2 else rest
    return f"```\n{reflect_instruction(current, _feedback_texts(side))}\n```"


# -- dspy.ReAct ------------------------------------------------------------------------------------
_REACT_OUTPUTS = {"next_tool_name", "next_tool_args"}
_FINISH = "finish"
_TOOL_LINE = re.compile(
    r"^\s*\((\d+)\) (\S+?)(?:, whose description is <desc>.*?</desc>\.|\.) It takes arguments (\{.*\})\.\s*$",
    re.MULTILINE,
)
_TRAJECTORY_STEP = re.compile(r"\[\[ ## tool_name_(\d+) ## \]\]")


def react_tools(p: Prompt) -> dict[str, JsonSchema] | None:
    """For a ``dspy.ReAct`` turn, ``{tool name: its arguments' JSON schemas}`` as the instructions list them.

    DSPy lists each tool as ``(N) name, whose description is <desc>...</desc>. It takes arguments {...}.``
    (the arguments as a Python dict repr); the valid names are those of ``next_tool_name``'s literal.
    Returns None for any other prompt.
    """
    if not set(p.output_fields) >= _REACT_OUTPUTS:
        return None
    tools: dict[str, JsonSchema] = {}
    for m in _TOOL_LINE.finditer(p.system):
        try:
            args = ast.literal_eval(m.group(3))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            args = {}
        tools[m.group(2)] = args if isinstance(args, dict) else {}
    names = p.hints.get("next_tool_name", {}).get("enum")
    if isinstance(names, list) and names:
        tools = {str(n): tools.get(str(n), {}) for n in names}
    return tools or None


def _tool_args(args: Mapping[str, Any], p: Prompt, key: str) -> dict[str, Any]:
    """Arguments for one tool call: plain strings come from the task's inputs (a search gets the question),
    everything else is generated from the argument's schema; arguments with a default are left out."""
    texts = [v for k, v in p.inputs.items() if k != "trajectory" and isinstance(v, str) and v.strip()]
    out: dict[str, Any] = {}
    for name, sub in args.items():
        schema = sub if isinstance(sub, Mapping) else {}
        if "default" in schema:
            continue
        plain = _deref(schema, schema)
        if plain.get("type") == "string" and not {"enum", "const", "format", "pattern"} & set(plain):
            given = p.inputs.get(name)
            out[name] = given if isinstance(given, str) else texts[0] if texts else mock_text(f"{key}.{name}")
        else:
            out[name] = _from_schema(schema, f"{key}.{name}", schema, 0)
    return out


def react_step(p: Prompt, seed: int = 0) -> dict[str, Any] | None:
    """``next_tool_name`` and ``next_tool_args`` for a ``dspy.ReAct`` turn, or None for other prompts.

    The plan depends on the seed and the task's inputs (not the trajectory): one or two calls of tools
    picked among those listed (never ``finish`` first), each with arguments fitting its schema, then
    ``finish`` with ``{}``. The step is read from the trajectory (``[[ ## tool_name_N ## ]]``).
    """
    tools = react_tools(p)
    if tools is None:
        return None
    steps = [int(i) for i in _TRAJECTORY_STEP.findall(p.inputs_text)]
    step = max(steps) + 1 if steps else 0
    task = json.dumps({k: v for k, v in p.inputs.items() if k != "trajectory"}, sort_keys=True, default=str)
    key = f"{seed}|react|{task}"
    callable_tools = [name for name in tools if name != _FINISH]
    if callable_tools and step < 1 + _digest(key + "|steps") % 2:
        name = _pick(callable_tools, f"{key}|tool|{step}")
        return {"next_tool_name": name, "next_tool_args": _tool_args(tools[name], p, f"{key}|args|{step}")}
    name = _FINISH if _FINISH in tools else next(iter(tools))
    return {"next_tool_name": name, "next_tool_args": _tool_args(tools[name], p, f"{key}|args|{step}")}


def generate(
    p: Prompt, *, seed: int = 0, scripted: Scripted | None = None, registry: SignatureRegistry | None = None
) -> tuple[dict[str, Any], dict[str, JsonSchema]]:
    """Output values (and the schema each was made for) for a parsed prompt."""
    sig = match_signature(p, registry, scripted)
    types = sig.output_types if sig else {}
    schemas = {name: types[name].json_schema() if name in types else p.hints.get(name, {}) for name in p.output_fields}
    out = {
        name: value_for(types[name] if name in types else schemas[name], f"{seed}|{name}|{p.inputs_text}")
        for name in p.output_fields
    }
    out.update(react_step(p, seed) or {})
    out.update(reflect_step(p) or {})
    script = scripted.get(sig.name if sig and sig.name in scripted else "*") if scripted else None
    if script is not None:
        given = _call_script(script, p.inputs, p.demos, p.instructions) if callable(script) else script
        if not isinstance(given, Mapping):
            raise TypeError(f"scripted answer must be a dict of outputs, got {type(given).__name__}")
        if "*text*" in given:  # fill every text output
            given = {k: given["*text*"] for k, sch in schemas.items() if sch.get("type") == "string"} or {}
        out.update({k: v for k, v in given.items() if k in out})
    return out, schemas


def _raw_ok(schema: Mapping[str, Any]) -> bool:
    """Whether DSPy's ChatAdapter reads this type's text verbatim (str, literal, str | None)."""
    if schema.get("type") == "string" or ("enum" in schema and all(isinstance(v, str) for v in schema["enum"])):
        return True
    members = schema.get("anyOf") or []
    kinds = {m.get("type") for m in members if isinstance(m, Mapping) and "enum" not in m}
    return {"string", "null"} <= kinds


def format_answer(p: Prompt, outputs: Mapping[str, Any], schemas: Mapping[str, JsonSchema]) -> str:
    """The assistant message for the prompt's adapter."""
    if p.adapter == JSON:
        return json.dumps(dict(outputs), ensure_ascii=False)
    blocks = []
    for name, value in outputs.items():
        raw = isinstance(value, str) and _raw_ok(schemas.get(name, {"type": "string"}))
        blocks.append(f"[[ ## {name} ## ]]\n{value if raw else json.dumps(value, ensure_ascii=False)}")
    blocks.append(_COMPLETED)
    return "\n\n".join(blocks)


def answer(
    messages: Sequence[Mapping[str, Any]], *, seed: int = 0, scripted: Scripted | None = None,
    registry: SignatureRegistry | None = None,
) -> str:
    """The mock assistant's reply to a DSPy-formatted chat prompt.

    Args:
        messages: OpenAI-style messages (``content`` as a str or a list of text parts).
        seed: Changes every generated value.
        scripted: ``{signature name or "*": outputs | callable}``; a callable gets the parsed inputs and,
            when it takes a second argument, the demos found in the prompt. Given fields override generated ones.
        registry: Where to look up the prompt's signature (default: the process-wide registry).

    Returns:
        ChatAdapter ``[[ ## field ## ]]`` blocks, a JSON object for JSONAdapter prompts, or plain text (for
        gepa's plain reflection template, the new instruction in a ``` block).
    """
    p = parse_prompt(messages)
    if not p.output_fields:
        key = p.inputs_text or (message_text(messages[-1]) if messages else "")
        return _plain_reflection(key) or mock_text(f"{seed}|text|{key}")
    outputs, schemas = generate(p, seed=seed, scripted=scripted, registry=registry)
    return format_answer(p, outputs, schemas)


def answer_for_schema(messages: Sequence[Mapping[str, Any]], schema: Mapping[str, Any], *, seed: int = 0) -> str:
    """A JSON object for a structured-output request (``response_format`` json_schema), keyed like :func:`answer`."""
    p = parse_prompt(messages)
    key_text = p.inputs_text or (message_text(messages[-1]) if messages else "")
    props = schema.get("properties")
    if not isinstance(props, Mapping):
        return json.dumps(_from_schema(schema, f"{seed}|$|{key_text}", schema, 0), ensure_ascii=False)
    out = {k: _from_schema(v, f"{seed}|{k}|{key_text}", schema, 0) for k, v in props.items()}
    out.update({k: v for k, v in (react_step(p, seed) or {}).items() if k in out})
    out.update({k: v for k, v in (reflect_step(p) or {}).items() if k in out})
    return json.dumps(out, ensure_ascii=False)


def count_tokens(text: str) -> int:
    """Approximate token count (about four characters a token)."""
    return len(text) // 4 + 1


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Approximate prompt tokens of a message list."""
    return sum(count_tokens(message_text(m)) for m in messages)
