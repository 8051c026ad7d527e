"""Every Redis client the project opens, built from settings in one place with one policy.

The policy: a read or a connect that waits longer than ``DSPEX_REDIS_SOCKET_TIMEOUT_S`` means Redis is gone
or stopped, so it fails (and redis-py reconnects on the next command) instead of blocking a worker thread, a
client's ``get()`` or a gateway request forever; idle pooled connections are health-checked before reuse
(a server restart or a NAT that dropped them is noticed, not hit mid-command); TCP keepalive is on.
Blocking reads (``XREAD BLOCK``, pub/sub ``get_message(timeout=...)``) always wait less than the socket
timeout, so the policy holds for them too.

Celery's own connections (broker, result backend) follow the same numbers through
:func:`dspex_tasks.app.celery_config`, which reads them from here.

Example:
    >>> from dspex_tasks.settings import Settings
    >>> client = redis_client(Settings(redis_url="redis://127.0.0.1:6390/3"))  # nothing connects yet
    >>> client.connection_pool.connection_kwargs["db"]
    3
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import redis
    import redis.asyncio

    from .settings import Settings

__all__ = ["HEALTH_CHECK_INTERVAL_S", "redis_client", "async_redis_client", "probe_client", "client_options",
           "lua", "register_lua"]

#: Idle pooled connections older than this are PINGed before reuse.
HEALTH_CHECK_INTERVAL_S = 25


def client_options(settings: Settings, *, timeout_s: float | None = None) -> dict[str, Any]:
    """The keyword arguments of every client: the one timeout and health-check policy."""
    timeout = settings.redis_socket_timeout_s if timeout_s is None else timeout_s
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "socket_keepalive": True, "health_check_interval": HEALTH_CHECK_INTERVAL_S}


def redis_client(settings: Settings, url: str | None = None, *, timeout_s: float | None = None) -> redis.Redis:
    """A ``redis.Redis`` for ``url`` (default ``DSPEX_REDIS_URL``). Nothing connects until the first command."""
    import redis as redis_lib

    return redis_lib.Redis.from_url(url or settings.redis_url, **client_options(settings, timeout_s=timeout_s))


def async_redis_client(settings: Settings, url: str | None = None) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`redis_client` (the gateway's event streams and result waits)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url or settings.redis_url, **client_options(settings))


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
