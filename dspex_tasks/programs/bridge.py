"""Everything that imports dspy for signatures: the ``dspy.Signature`` class and modules.

Kept apart so that ``dspex_tasks.dsl.signature`` (and the client) never import dspy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dspy

from ..dsl.types import TypeNode

if TYPE_CHECKING:  # pragma: no cover
    from ..dsl.signature import Signature

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


def build_dspy_signature(sig: Signature) -> type[dspy.Signature]:
    fields: dict[str, Any] = {}
    for name, node in sig.input_types.items():
        desc = _desc(node)
        fields[name] = (_annotation(node), dspy.InputField(desc=desc) if desc else dspy.InputField())
    for name, node in sig.output_types.items():
        desc = _desc(node)
        fields[name] = (_annotation(node), dspy.OutputField(desc=desc) if desc else dspy.OutputField())
    instructions = sig.instructions or f"Given the fields {', '.join(sig.input_fields)}, produce {', '.join(sig.output_fields)}."
    class_name = "".join(p.capitalize() for p in sig.name.replace("-", "_").replace(".", "_").split("_")) or "Sig"
    made: type[dspy.Signature] = dspy.make_signature(fields, instructions, signature_name=class_name)
    return made


def build_module(sig: Signature) -> dspy.Module:
    dsig = sig.to_dspy()
    if sig.module == "chain_of_thought":
        return dspy.ChainOfThought(dsig)
    return dspy.Predict(dsig)
