"""Sentiment classification into a fixed set of labels."""

from __future__ import annotations

from dspex_tasks import signature

__all__ = ["classify", "LABELS"]

LABELS = ("positive", "negative", "neutral")

classify = signature(
    'text: str -> label: literal["positive", "negative", "neutral"], confidence: confidence_score',
    name="classify",
    instructions="Classify the sentiment of the text as positive, negative or neutral, with a confidence between 0 and 1.",
)
