"""Multi-hop search, as in DSPy's multi-hop tutorial: write a query, read, take notes, repeat.

Given a claim, it returns the titles of the passages needed to verify it.
"""

from __future__ import annotations

import dspy

from dspex_tasks import program

from .corpus import search

__all__ = ["Hop"]


@program("multihop", interface="claim -> titles: list[str]")
class Hop(dspy.Module):
    def __init__(self, num_docs=5, num_hops=3):
        super().__init__()
        self.num_docs, self.num_hops = num_docs, num_hops
        self.generate_query = dspy.ChainOfThought("claim, notes -> query")
        self.append_notes = dspy.ChainOfThought("claim, notes, context -> new_notes: list[str], titles: list[str]")

    def forward(self, claim: str) -> dspy.Prediction:
        notes = []
        titles = []

        for _ in range(self.num_hops):
            query = self.generate_query(claim=claim, notes=notes).query
            context = search(query, k=self.num_docs)
            prediction = self.append_notes(claim=claim, notes=notes, context=context)
            notes.extend(prediction.new_notes)
            titles.extend(prediction.titles)

        # dict.fromkeys, not set(): the same order in every worker process
        return dspy.Prediction(notes=notes, titles=list(dict.fromkeys(titles)))
