"""Best-of-N with feedback (``dspy.Refine``), as in DSPy's output refinement tutorial.

Answers questions about the Veshan Isles from retrieved passages, retrying with the LM's own
advice until the answer is a single word (a name, a year, a number).
"""

from __future__ import annotations

import dspy

from dspex_tasks import program

from .corpus import search

__all__ = ["Answer", "one_word_answer", "best_answer"]


class Answer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.respond = dspy.ChainOfThought("context, question -> answer")

    def forward(self, question):
        return self.respond(context=search(question, k=3), question=question)


def one_word_answer(args, pred: dspy.Prediction) -> float:
    return 1.0 if len(pred.answer.split()) == 1 else 0.0


@program("best_answer", interface="question -> answer")
def best_answer():
    return dspy.Refine(module=Answer(), N=3, reward_fn=one_word_answer, threshold=1.0)
