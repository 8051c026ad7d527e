"""Programs for the system tests, written as DSPy's tutorials write them (workers import this module)."""

from __future__ import annotations

from typing import Literal

import dspy
import pydantic

from dspex_tasks import program

PASSAGES = [
    "The Eiffel Tower is a wrought-iron tower in Paris, completed in 1889.",
    "Mount Fuji is the highest mountain in Japan, 3,776 metres tall.",
    "The Nile is a river in north-eastern Africa that flows through Egypt.",
    "Paris is the capital and most populous city of France.",
]


def search(query: str, k: int = 2) -> list[str]:
    words = set(query.lower().split())
    return sorted(PASSAGES, key=lambda p: -len(words & set(p.lower().replace(",", "").rstrip(".").split())))[:k]


@program("sys_rag", interface="question -> response")
class RAG(dspy.Module):
    def __init__(self):
        super().__init__()
        self.respond = dspy.ChainOfThought("context, question -> response")

    def forward(self, question):
        return self.respond(context=search(question), question=question)


@program("sys_hop", interface="claim -> verdict: bool")
class Hop(dspy.Module):
    def __init__(self, hops=2):
        super().__init__()
        self.hops = hops
        self.generate_query = dspy.ChainOfThought("claim, notes -> query")
        self.answer = dspy.Predict("claim, notes -> verdict: bool")

    def forward(self, claim):
        notes = []
        for _ in range(self.hops):
            notes.extend(search(self.generate_query(claim=claim, notes=notes).query))
        return self.answer(claim=claim, notes=notes)


class Person(pydantic.BaseModel):
    name: str
    role: Literal["author", "editor"]


class People(dspy.Signature):
    """Extract the people mentioned in the text."""

    text: str = dspy.InputField()
    people: list[Person] = dspy.OutputField()


@program("sys_people", interface=People)
def people():
    return dspy.Predict(People)


@program("sys_draft", interface="question -> answer")
class DraftThenAnswer(dspy.Module):
    """Two predictors: a draft, then an answer that reasons over it (optimization system tests)."""

    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.ChainOfThought("question, draft -> answer")  # the optimizer's proposer reads this line

    def forward(self, question):
        return self.answer(question=question, draft=self.draft(question=question).draft)


@program("sys_draft_factory", interface="question -> answer")
def draft_factory():
    """A factory returning a bare predictor, in which DSPy's own source lookup finds nothing of the program."""
    return dspy.Predict(dspy.Signature("question -> answer", "Answer in the house style."))  # from a factory
