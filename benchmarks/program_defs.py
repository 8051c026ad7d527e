"""What ``bench_program.py`` serves: one signature, and a 2-predictor program (as DSPy tutorials write it)."""

from __future__ import annotations

import dspy

from dspex_tasks import program, signature

one = signature("question -> answer", name="bench_one")

NOTES = ["The Eiffel Tower is in Paris.", "Mount Fuji is in Japan.", "The Nile flows through Egypt."]


@program("bench_two", interface="question -> answer")
class TwoStep(dspy.Module):
    """Draft a query, then answer from notes: two predictors, two LM calls per job."""

    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> query")
        self.answer = dspy.Predict("question, notes -> answer")

    def forward(self, question):
        query = self.draft(question=question).query
        return self.answer(question=question, notes=[n for n in NOTES if n[:3] in query] or NOTES[:1])
