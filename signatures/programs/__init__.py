"""Reference programs: ``dspy.Module``s served as tasks, written as in DSPy's tutorials.

Importing this package registers them: ``rag``, ``multihop``, ``agent``, ``best_answer`` and
``extract``. They search ``signatures/programs/data/corpus.jsonl`` (see :mod:`.corpus`).
"""

from __future__ import annotations

from .agent import make_agent
from .extract import ExtractFacts, extract
from .multihop import Hop
from .rag import RAG
from .refine import best_answer

__all__ = ["RAG", "Hop", "make_agent", "best_answer", "extract", "ExtractFacts", "NAMES"]

#: The registered program names.
NAMES = ("rag", "multihop", "agent", "best_answer", "extract")
