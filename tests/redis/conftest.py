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
    from celery.contrib.testing.worker import start_worker

    from dspex_tasks.worker.app import create_worker_app

    app = create_worker_app(settings, signatures=signatures, import_modules=False)
    with start_worker(app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=10):
        app.runtime  # noqa: B018 - warm and publish before the test submits
        yield app
    app.reset_runtime()


@pytest.fixture
def opt_app(settings: Any, signatures: SignatureRegistry) -> Iterator[Any]:
    """A worker serving both queues, with the mock scenario in which demos help (optimizations can win)."""
    from celery.contrib.testing.worker import start_worker

    from dspex_tasks.worker.app import create_worker_app

    s = settings.model_copy(update={"mock_scenario": "learns_from_demos"})
    app = create_worker_app(s, signatures=signatures, import_modules=False)
    with start_worker(app, pool="threads", concurrency=12, perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=10, queues=[s.predict_queue, s.optimize_queue]):
        app.runtime  # noqa: B018
        yield app
    app.reset_runtime()


@pytest.fixture
def client(worker_app: Any, settings: Any) -> Iterator[Any]:
    from dspex_tasks.client import Client

    c = Client(settings=settings)
    yield c
    c.close()
