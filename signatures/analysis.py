"""DSPex's ComplexAnalysis example: reasoning, confidence and entities over a text.

The DSPex seed declared it as::

    text: :string, context: {:list, :string}
      -> analysis: :reasoning_chain, confidence: :confidence_score, entities: {:list, :entity}

which parses to the same signature as the Python spelling used here.
"""

from __future__ import annotations

from dspex_tasks import signature

__all__ = ["complex_analysis"]

complex_analysis = signature(
    "text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, entities: list[entity]",
    name="complex_analysis",
    instructions=(
        "Analyze the text using the context. Give the analysis as a list of reasoning steps, a confidence "
        "between 0 and 1, and the named entities in the text, each with its text, type and, when known, "
        "its character offsets."
    ),
    module="chain_of_thought",
)
