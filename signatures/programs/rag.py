"""Retrieval-augmented generation over the Veshan Isles corpus, as in DSPy's RAG tutorial."""

from __future__ import annotations

import dspy

from dspex_tasks import program

from .corpus import search

__all__ = ["RAG"]


@program("rag", interface="question -> response")
class RAG(dspy.Module):
    def __init__(self):
        super().__init__()
        self.respond = dspy.ChainOfThought("context, question -> response")

    def forward(self, question):
        context = search(question, k=5)
        return self.respond(context=context, question=question)
