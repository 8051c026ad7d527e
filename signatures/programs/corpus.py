"""A small searchable corpus for the reference programs: facts about the (fictional) Veshan Isles.

``signatures/programs/data/corpus.jsonl`` holds one ``{"title", "text"}`` passage a line. As in DSPy's
multi-hop tutorial, each passage is ``"title | text"`` and the index is BM25 (``bm25s`` with an
English Snowball stemmer), built once per process on first use.

Example:
    >>> from signatures.programs.corpus import search
    >>> search("Where does the Caddow fox live?", k=1)[0].split(" | ")[0]
    'Caddow fox'
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import bm25s
import Stemmer

__all__ = ["CORPUS_PATH", "corpus", "search", "lookup"]

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.jsonl"  # package data: in wheels too

_lock = threading.Lock()
_index: tuple[list[str], Any, Any] | None = None


def corpus() -> list[str]:
    """All passages, ``"title | text"``, in file order."""
    return _load()[0]


def _load() -> tuple[list[str], Any, Any]:
    global _index
    with _lock:
        if _index is None:
            with CORPUS_PATH.open(encoding="utf-8") as f:
                docs = [json.loads(line) for line in f if line.strip()]
            passages = [f"{d['title']} | {d['text']}" for d in docs]
            stemmer = Stemmer.Stemmer("english")
            corpus_tokens = bm25s.tokenize(passages, stopwords="en", stemmer=stemmer, show_progress=False)
            retriever = bm25s.BM25(k1=0.9, b=0.4)
            retriever.index(corpus_tokens, show_progress=False)
            _index = (passages, stemmer, retriever)
        return _index


def search(query: str, k: int = 5) -> list[str]:
    """The ``k`` passages that best match ``query`` by BM25, best first (passages sharing no term are left out)."""
    passages, stemmer, retriever = _load()
    tokens = bm25s.tokenize(query, stopwords="en", stemmer=stemmer, show_progress=False)
    results, scores = retriever.retrieve(tokens, k=min(k, len(passages)), n_threads=1, show_progress=False)
    return [passages[doc] for doc, score in zip(results[0], scores[0], strict=True) if score > 0]


def lookup(title: str) -> str | None:
    """The passage titled ``title`` (case-insensitive), or None."""
    wanted = title.strip().strip("`'\"").lower()
    for passage in corpus():
        if passage.split(" | ", 1)[0].lower() == wanted:
            return passage
    return None
