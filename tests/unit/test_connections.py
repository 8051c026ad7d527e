"""One connection factory: every client the project opens follows the same timeout and health-check policy."""

from __future__ import annotations

from typing import Any

import pytest

from dspex_tasks.app import celery_config
from dspex_tasks.client import Client
from dspex_tasks.connections import HEALTH_CHECK_INTERVAL_S, async_redis_client, redis_client
from dspex_tasks.programs.store import ProgramStore
from dspex_tasks.settings import Settings
from dspex_tasks.worker.runtime import Runtime

pytestmark = pytest.mark.unit

URL = "redis://127.0.0.1:6399/7"  # nothing connects in these tests


def _policy(client: Any) -> tuple[Any, ...]:
    kw = client.connection_pool.connection_kwargs
    return kw["socket_timeout"], kw["socket_connect_timeout"], kw["health_check_interval"], kw["socket_keepalive"]


def test_every_client_follows_the_settings_timeout() -> None:
    s = Settings(redis_url=URL, redis_socket_timeout_s=7.5)
    want = (7.5, 7.5, HEALTH_CHECK_INTERVAL_S, True)
    assert _policy(redis_client(s)) == want
    assert _policy(async_redis_client(s)) == want
    assert _policy(Client(settings=s).redis) == want
    # the worker's own client had no socket timeout before: a stopped Redis blocked its threads forever
    assert _policy(Runtime(s).redis) == want
    assert redis_client(s).connection_pool.connection_kwargs["db"] == 7


def test_a_store_from_a_url_follows_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_REDIS_SOCKET_TIMEOUT_S", "4")
    assert _policy(ProgramStore.from_url(URL).redis)[0] == 4.0


def test_celery_uses_the_same_numbers() -> None:
    conf = celery_config(Settings(redis_url=URL, redis_socket_timeout_s=7.5))
    transport = conf["broker_transport_options"]
    assert transport["socket_timeout"] == transport["socket_connect_timeout"] == conf["redis_socket_timeout"] == 7.5
    assert transport["health_check_interval"] == conf["redis_backend_health_check_interval"] == HEALTH_CHECK_INTERVAL_S
