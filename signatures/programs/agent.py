"""A ``dspy.ReAct`` agent with typed tools, as in DSPy's agents and tool-use tutorials.

The tools are plain functions; their type hints and docstrings are what the LM sees.
"""

from __future__ import annotations

import datetime

import dspy

from dspex_tasks import program

from .corpus import lookup, search

__all__ = ["search_veshan", "lookup_veshan", "years_between", "day_of_week", "make_agent"]


def search_veshan(query: str) -> list[str]:
    """Returns the top-3 passages about the Veshan Isles for the query, then the titles of the next few."""
    top = search(query, k=8)
    titles = [f"`{x.split(' | ')[0]}`" for x in top[3:]]
    return top[:3] + ([f"Other retrieved pages have titles: {', '.join(titles)}."] if titles else [])


def lookup_veshan(title: str) -> str:
    """Returns the passage with this title, if it exists."""
    found = lookup(title)
    if found is not None:
        return found
    results = search(title, k=1)
    if not results:
        return f"No passage found for title: {title}"
    return f"No passage titled {title!r}; the closest is: {results[0]}"


def years_between(start_year: int, end_year: int) -> int:
    """Returns how many years passed from start_year to end_year (negative if end_year is earlier)."""
    return end_year - start_year


def day_of_week(date: datetime.date) -> str:
    """Returns the day of the week (e.g. 'Monday') of a calendar date."""
    return date.strftime("%A")


@program("agent", interface="question -> answer")
def make_agent():
    instructions = "Answer questions about the Veshan Isles. Look facts up with the tools rather than guessing."
    signature = dspy.Signature("question -> answer", instructions)
    return dspy.ReAct(signature, tools=[search_veshan, lookup_veshan, years_between, day_of_week], max_iters=6)
