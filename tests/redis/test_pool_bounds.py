"""Layer 2: connection pools block at their cap (a busy Redis is not a down one) and a wait that runs out is typed."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dspex_tasks import errors
from dspex_tasks.connections import async_redis_client, redis_client

pytestmark = pytest.mark.redis


def test_more_concurrent_commands_than_connections_wait_instead_of_failing(settings: Any) -> None:
    s = settings.model_copy(update={"redis_max_connections": 2, "redis_pool_wait_s": 5.0})
    client = redis_client(s)
    try:
        # each BLPOP holds its connection ~50 ms: 20 of them over 2 connections must queue for the pool
        def op(i: int) -> Any:
            client.blpop([f"{s.namespace}:empty:{i}"], timeout=0.05)
            return client.incr(f"{s.namespace}:n")

        with ThreadPoolExecutor(20) as ex:
            results = list(ex.map(op, range(20)))
        assert sorted(results) == list(range(1, 21))
        assert len(client.connection_pool._connections) <= 2

        async def main() -> list[Any]:
            aclient = async_redis_client(s)
            try:
                async def aop(i: int) -> Any:
                    await aclient.blpop([f"{s.namespace}:aempty:{i}"], timeout=0.05)
                    return await aclient.incr(f"{s.namespace}:an")

                return list(await asyncio.gather(*(aop(i) for i in range(20))))
            finally:
                await aclient.aclose()

        assert sorted(asyncio.run(main())) == list(range(1, 21))
    finally:
        client.close()


def test_a_pool_wait_that_runs_out_is_a_typed_error_from_job_get(settings: Any) -> None:
    import redis

    from dspex_tasks.client import Client

    s = settings.model_copy(update={"redis_max_connections": 2, "redis_pool_wait_s": 0.1})
    # the shared client: a held pool makes a command fail after the wait with redis's ConnectionError
    plain = redis_client(s)
    held_plain = [plain.connection_pool.get_connection() for _ in range(2)]
    t0 = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()
    assert time.monotonic() - t0 < 2
    for conn in held_plain:
        plain.connection_pool.release(conn)
    assert plain.ping()
    plain.close()

    # the result backend's pool (Celery's own): Job.get maps the same error to BackendUnavailable
    c = Client(settings=s)
    try:
        pool = c.app.backend.client.connection_pool
        assert isinstance(pool, redis.BlockingConnectionPool) and pool.max_connections == 2
        held = [pool.get_connection() for _ in range(2)]
        # Celery's pub/sub reconnect resets the pool (forgetting held connections); keep them held here
        pool.reset = lambda: None  # type: ignore[method-assign]
        try:
            t0 = time.monotonic()
            with pytest.raises(errors.BackendUnavailable):
                c.job(uuid.uuid4().hex).get(timeout=8)
            assert time.monotonic() - t0 < 8
        finally:
            for conn in held:
                pool.release(conn)
    finally:
        c.close()
