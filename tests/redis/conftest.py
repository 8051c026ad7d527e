"""Layer 2: a real Redis and an in-process worker (celery.contrib.testing)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks.dsl.signature import SignatureRegistry, signature


@pytest.fixture
def signatures() -> SignatureRegistry:
    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str, confidence: confidence_score", name="qa",
                      instructions="Answer the question.", register=False))
    reg.add(signature("text: str, context: list[str] -> analysis: reasoning_chain, confidence: confidence_score, "
                      "entities: list[entity]", name="complex_analysis", register=False))
    return reg


@pytest.fixture
def worker_app(settings: Any, signatures: SignatureRegistry) -> Iterator[Any]:
    """The plugin's in-process worker (what ``dspex_worker`` runs), on this layer's own two signatures."""
    from dspex_tasks.testing.plugin import running_worker

    with running_worker(settings, signatures=signatures) as app:
        yield app


@pytest.fixture
def opt_app(settings: Any, signatures: SignatureRegistry) -> Iterator[Any]:
    """A worker serving both queues, with the mock scenario in which demos help (optimizations can win)."""
    from dspex_tasks.testing.plugin import running_worker

    s = settings.model_copy(update={"mock_scenario": "learns_from_demos"})
    with running_worker(s, signatures=signatures, concurrency=12) as app:
        yield app


@pytest.fixture
def client(worker_app: Any, settings: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=settings)
    yield c
    c.close()
