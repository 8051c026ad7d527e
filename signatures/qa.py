"""Question answering with a calibrated confidence."""

from __future__ import annotations

from dspex_tasks import signature

__all__ = ["qa"]

qa = signature(
    "question: str -> answer: str, confidence: confidence_score",
    name="qa",
    instructions=(
        "Answer the question concisely and factually. Set confidence to a number between 0 and 1 "
        "that reflects how likely the answer is to be correct."
    ),
)
