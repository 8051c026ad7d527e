"""Summarization under a word budget, with the key points listed."""

from __future__ import annotations

from dspex_tasks import signature

__all__ = ["summarize"]

summarize = signature(
    "text: str, max_words: int -> summary: str, key_points: list[str]",
    name="summarize",
    instructions=(
        "Summarize the text in at most max_words words, then list its key points, one short sentence each."
    ),
)
