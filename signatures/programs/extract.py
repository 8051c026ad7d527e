"""Typed extraction into pydantic models, as in DSPy's entity and email extraction tutorials."""

from __future__ import annotations

from typing import Literal

import dspy
from pydantic import BaseModel

from dspex_tasks import program

__all__ = ["Person", "Event", "ExtractFacts", "extract"]


class Person(BaseModel):
    name: str
    role: str


class Event(BaseModel):
    name: str
    year: int
    kind: Literal["founding", "construction", "disaster", "treaty", "other"]
    people: list[Person]


class ExtractFacts(dspy.Signature):
    """Extract the people and the dated events mentioned in a passage of text."""

    text: str = dspy.InputField(desc="a passage of text")
    people: list[Person] = dspy.OutputField(desc="every specific person mentioned, with their role")
    events: list[Event] = dspy.OutputField(desc="every event with a year, and the people involved in it")


@program("extract", interface=ExtractFacts)
def extract():
    return dspy.ChainOfThought(ExtractFacts)
