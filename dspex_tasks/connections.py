"""Every Redis client the project opens, built from settings in one place with one policy.

The policy: a read or a connect that waits longer than ``DSPEX_REDIS_SOCKET_TIMEOUT_S`` means Redis is gone
or stopped, so it fails (and redis-py reconnects on the next command) instead of blocking a worker thread, a
client's ``get()`` or a gateway request forever; idle pooled connections are health-checked before reuse
(a server restart or a NAT that dropped them is noticed, not hit mid-command); TCP keepalive is on.
Blocking reads (``XREAD BLOCK``, pub/sub ``get_message(timeout=...)``) always wait less than the socket
timeout, so the policy holds for them too. Pools block: at most ``DSPEX_REDIS_MAX_CONNECTIONS`` connections
per client, and a command over the cap waits up to ``DSPEX_REDIS_POOL_WAIT_S`` for a free one (redis-py's
default pool raises ``MaxConnectionsError`` at once, which made a busy but healthy Redis look down); a wait
that runs out raises redis's ``ConnectionError``, which callers map to ``errors.BackendUnavailable``. A write
Redis refuses because it is full (used memory above ``maxmemory``, policy ``noeviction``) raises
``errors.StoreFull`` naming the URL (password redacted), never redis's raw ``OutOfMemoryError``.

Celery's own connections (broker, result backend) follow the same numbers through
:func:`dspex_tasks.app.celery_config`, which reads them from here.

Example:
    >>> from dspex_tasks.settings import Settings
    >>> client = redis_client(Settings(redis_url="redis://127.0.0.1:6390/3"))  # nothing connects yet
    >>> client.connection_pool.connection_kwargs["db"]
    3
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import redis
    import redis.asyncio

    from .errors import StoreFull
    from .settings import Settings

__all__ = ["HEALTH_CHECK_INTERVAL_S", "redis_client", "async_redis_client", "probe_client", "client_options",
           "pool_options", "lua", "register_lua", "redacted_url", "unreachable_message", "ping",
           "amqp_connection", "is_store_full", "store_full_error", "typed_store_full"]

#: Idle pooled connections older than this are PINGed before reuse.
HEALTH_CHECK_INTERVAL_S = 25


def client_options(settings: Settings, *, timeout_s: float | None = None) -> dict[str, Any]:
    """The keyword arguments of every client: the one timeout and health-check policy."""
    timeout = settings.redis_socket_timeout_s if timeout_s is None else timeout_s
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "socket_keepalive": True, "health_check_interval": HEALTH_CHECK_INTERVAL_S}


def pool_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of every (blocking) pool: its cap and how long a command waits for a free slot."""
    return {"max_connections": settings.redis_max_connections, "timeout": settings.redis_pool_wait_s}


def redis_client(settings: Settings, url: str | None = None, *, timeout_s: float | None = None) -> redis.Redis:
    """A ``redis.Redis`` for ``url`` (default ``DSPEX_REDIS_URL``). Nothing connects until the first command."""
    import redis as redis_lib

    pool = redis_lib.BlockingConnectionPool.from_url(url or settings.redis_url, **pool_options(settings),
                                                     **client_options(settings, timeout_s=timeout_s))
    client: redis.Redis = _typed_clients()[0].from_pool(pool)  # close() disconnects the pool too
    client._dspex_url = url or settings.redis_url  # type: ignore[attr-defined]
    return client


def async_redis_client(settings: Settings, url: str | None = None) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`redis_client` (the gateway's event streams and result waits)."""
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(url or settings.redis_url, **pool_options(settings),
                                                    **client_options(settings))
    client: redis.asyncio.Redis = _typed_clients()[1].from_pool(pool)
    client._dspex_url = url or settings.redis_url  # type: ignore[attr-defined]
    return client


def probe_client(url: str, timeout_s: float) -> redis.Redis:
    """A client for a one-off reachability check: short timeouts, no retries, no health checks.

    Used before settings can be trusted (``dspex health``, the embedded Redis launcher), so it takes a URL.
    """
    import redis as redis_lib
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis_lib.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                    retry=Retry(NoBackoff(), 0))


@functools.cache
def lua(module: str, name: str) -> str:
    """The text of ``lua/<name>.lua`` in the folder of ``module`` (a ``__name__``), read once per process."""
    return (resources.files(module.rpartition(".")[0]) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def register_lua(redis: Any, module: str, name: str) -> Any:
    """``redis.register_script`` for the script ``lua/<name>.lua`` next to ``module`` (pass ``__name__``):
    run by EVALSHA, loaded into Redis on first use."""
    return redis.register_script(lua(module, name))


def redacted_url(url: str) -> str:
    """``url`` without its password (and unchanged when it has none)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user, _, password = creds.partition(":")
    if not password:
        return url
    return f"{scheme}://{user}:***@{host}"


def unreachable_message(what: str, url: str, exc: BaseException, *, variable: str = "DSPEX_REDIS_URL",
                        configured: bool = True) -> str:
    """One line for a Redis (or broker) that did not answer: the URL, the reason, and the variable to set."""
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    if text.startswith("Error ") and ". " in text:  # redis-py: "Error 111 connecting to h:p. Connection refused."
        text = text.split(". ", 1)[-1]
    hint = (f"{variable} is not set, so the default was tried: set it to your Redis" if not configured
            else f"is it running? (or set {variable} to one that answers)")
    return f"{what} at {redacted_url(url)} ({text}); {hint}"


def ping(url: str, timeout_s: float) -> None:
    """PING a Redis URL, or open and close an AMQP connection (a connection is its ping); raises on failure."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        conn = probe_client(url, timeout_s)
        try:
            conn.ping()
        finally:
            conn.close()
        return
    with amqp_connection(url, timeout_s) as kconn:
        kconn.ensure_connection(max_retries=0, timeout=timeout_s)  # one attempt: callers have their own deadline


def amqp_connection(url: str, timeout_s: float) -> Any:
    """A ``kombu.Connection`` to an AMQP broker for a one-off look (a ping, queue depths): the connect and
    socket reads time out after ``timeout_s``. Nothing connects until it is used; close it (``with``)."""
    from kombu import connection as kombu_connection

    connection_cls: Any = kombu_connection.Connection
    return connection_cls(url, connect_timeout=timeout_s, transport_options={"read_timeout": timeout_s,
                                                                              "write_timeout": timeout_s})


def is_store_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is Redis refusing a write because it is full (``OOM``)."""
    from redis.exceptions import OutOfMemoryError

    from .errors import StoreFull

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # kombu re-raises redis errors as its own
        if isinstance(current, OutOfMemoryError | StoreFull):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def store_full_error(url: str) -> StoreFull:
    """The typed error for a write the Redis at ``url`` refused because it is full (the URL without password)."""
    from .errors import StoreFull

    return StoreFull(f"Redis at {redacted_url(url)} is full: it refused a write because its used memory is above "
                     "'maxmemory' (maxmemory-policy noeviction); free memory (expire or delete keys) or raise "
                     "maxmemory")


@contextlib.contextmanager
def typed_store_full(url: str) -> Iterator[None]:
    """Around a publish: raise :func:`store_full_error` instead of a Redis (or kombu) error that says Redis is
    full, and :class:`~dspex_tasks.errors.BackendUnavailable` naming the broker instead of kombu's
    ``OperationalError`` when the broker does not answer (nothing was enqueued in either case)."""
    from kombu.exceptions import OperationalError

    from .errors import BackendUnavailable, StoreFull

    try:
        yield
    except StoreFull:
        raise
    except Exception as exc:
        if is_store_full(exc):
            raise store_full_error(url) from exc
        if isinstance(exc, OperationalError):
            amqp = url.startswith(("amqp", "pyamqp"))
            raise BackendUnavailable(unreachable_message(
                "cannot reach RabbitMQ" if amqp else "cannot reach Redis", url, exc,
                variable="DSPEX_BROKER_URL" if amqp else "DSPEX_REDIS_URL") + "; nothing was enqueued") from exc
        raise


@functools.cache
def _typed_clients() -> tuple[type[redis.Redis], type[redis.asyncio.Redis]]:
    """``redis.Redis`` and its asyncio twin whose commands, pipelines and scripts raise ``errors.StoreFull``."""
    import redis as redis_lib
    import redis.asyncio as aioredis
    from redis.asyncio.client import Pipeline as AsyncPipeline
    from redis.client import Pipeline

    class TypedPipeline(Pipeline):
        _dspex_url = ""

        def execute(self, raise_on_error: bool = True) -> Any:
            with typed_store_full(self._dspex_url):
                return super().execute(raise_on_error)

    class TypedRedis(redis_lib.Redis):
        _dspex_url = ""

        def execute_command(self, *args: Any, **options: Any) -> Any:
            with typed_store_full(self._dspex_url):
                return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

        def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
            pipe = TypedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
            pipe._dspex_url = self._dspex_url
            return pipe

    class AsyncTypedPipeline(AsyncPipeline):
        _dspex_url = ""

        async def execute(self, raise_on_error: bool = True) -> Any:
            with typed_store_full(self._dspex_url):
                return await super().execute(raise_on_error)

    class AsyncTypedRedis(aioredis.Redis):
        _dspex_url = ""

        async def execute_command(self, *args: Any, **options: Any) -> Any:
            with typed_store_full(self._dspex_url):
                return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

        def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
            pipe = AsyncTypedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
            pipe._dspex_url = self._dspex_url
            return pipe

    return TypedRedis, AsyncTypedRedis
