"""Shared fixtures for the three test layers.

Layer 2 and 3 tests get a private redis-server on a free port (never DB 0 of a
shared server). ``DSPEX_TEST_REDIS_URL`` may point at another server; then a
dedicated DB (default 13) is flushed before each test.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Import hypothesis (and the module its pytest plugin imports at the end of a run) up front:
# imported that late, after worker threads ran, CPython 3.11.7's ast.parse inside pytest's
# assertion rewriter can fail with "AST constructor recursion depth mismatch".
import hypothesis  # noqa: F401
import hypothesis.internal.observability  # noqa: F401
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests must never pick up a developer's real LM key or settings.
for _var in [v for v in os.environ if v.startswith("DSPEX_") and not v.startswith("DSPEX_TEST_")]:
    del os.environ[_var]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A private Redis server for the whole run (or None when DSPEX_TEST_REDIS_URL is given)."""
    if os.environ.get("DSPEX_TEST_REDIS_URL"):
        yield None
        return
    from dspex_tasks.testing.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_base_url(redis_server: Any) -> str:
    url = os.environ.get("DSPEX_TEST_REDIS_URL")
    if url:
        if url.rstrip("/").endswith("/0") or url.count("/") < 3:
            raise pytest.UsageError("DSPEX_TEST_REDIS_URL must name a dedicated DB, not DB 0")
        return url
    return str(redis_server.url)


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """A flushed database for one test."""
    import redis

    r = redis.Redis.from_url(redis_base_url)
    r.flushdb()
    r.close()
    yield redis_base_url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    import redis

    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(redis_url: str, namespace: str) -> Any:
    from dspex_tasks.settings import Settings

    return Settings(redis_url=redis_url, namespace=namespace, worker_concurrency=8, prewarm_sessions=10,
                    cache_verify_s=0.2)
