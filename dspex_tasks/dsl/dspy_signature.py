"""The DSL rendered as a real ``dspy.Signature`` class (typed fields, descriptions, instructions).

The only module of :mod:`dspex_tasks.dsl` that imports dspy; :meth:`Signature.to_dspy` imports it on first
use, so defining signatures (and the client) never imports dspy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dspy

from .types import TypeNode

__all__ = ["build_dspy_signature"]

_DESCRIPTIONS = {
    "confidence_score": "a number between 0 and 1",
    "reasoning_chain": "a list of reasoning steps",
    "embedding": "a list of numbers",
    "entity": "an entity with text, type and optional start/end offsets",
}


def _annotation(node: TypeNode) -> Any:
    # DSPy renders annotations in prompts: plain types read better than our validators.
    return node.python_type(plain=True)


def _desc(node: TypeNode) -> str:
    if node.kind in _DESCRIPTIONS:
        return _DESCRIPTIONS[node.kind]
    if node.kind == "list" and node.args[0].kind in _DESCRIPTIONS:
        return "a list, each item " + _DESCRIPTIONS[node.args[0].kind]
    return ""


def build_dspy_signature(name: str, inputs: Mapping[str, TypeNode], outputs: Mapping[str, TypeNode],
                         instructions: str) -> type[dspy.Signature]:
    """A ``dspy.Signature`` subclass named after ``name`` with the given typed fields."""
    fields: dict[str, Any] = {}
    for fname, node in inputs.items():
        desc = _desc(node)
        fields[fname] = (_annotation(node), dspy.InputField(desc=desc) if desc else dspy.InputField())
    for fname, node in outputs.items():
        desc = _desc(node)
        fields[fname] = (_annotation(node), dspy.OutputField(desc=desc) if desc else dspy.OutputField())
    text = instructions or f"Given the fields {', '.join(inputs)}, produce {', '.join(outputs)}."
    class_name = "".join(p.capitalize() for p in name.replace("-", "_").replace(".", "_").split("_")) or "Sig"
    made: type[dspy.Signature] = dspy.make_signature(fields, text, signature_name=class_name)
    return made
