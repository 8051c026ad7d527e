from __future__ import annotations

import json
import time
from typing import Any

import pytest

from dspex_tasks import keys
from dspex_tasks.programs.store import ProgramStore
from tests._store_contract import StoreContract

pytestmark = pytest.mark.redis


class TestRedisStore(StoreContract):
    @pytest.fixture
    def store(self, redis_client: Any, namespace: str) -> ProgramStore:
        return ProgramStore(redis=redis_client, namespace=namespace, max_state_bytes=10_000)


def test_every_key_is_under_the_namespace(redis_client: Any, namespace: str) -> None:
    store = ProgramStore(redis=redis_client, namespace=namespace)
    store.put("s1", "qa", {"n": 1}, token="tok")
    names = [k.decode() for k in redis_client.keys("*")]
    assert names and all(n.startswith(f"{namespace}:") for n in names)


def test_writes_publish_invalidations(redis_client: Any, namespace: str) -> None:
    store = ProgramStore(redis=redis_client, namespace=namespace)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.program_events(namespace))
    time.sleep(0.05)
    store.put("s1", "qa", {"n": 1})
    store.put("s1", "qa", {"n": 2})
    store.rollback("s1", "qa", 1)
    store.delete("s1", "qa")
    seen = []
    deadline = time.time() + 2
    while len(seen) < 4 and time.time() < deadline:
        msg = pubsub.get_message(timeout=0.2)
        if msg:
            seen.append(json.loads(msg["data"]))
    assert [m["version"] for m in seen] == [1, 2, 1, 0]
    assert all(m["session"] == "s1" and m["program"] == "qa" for m in seen)


def test_session_ttl_expires_programs(redis_client: Any, namespace: str) -> None:
    store = ProgramStore(redis=redis_client, namespace=namespace, session_ttl_s=1)
    store.put("s1", "qa", {"n": 1})
    assert 0 < redis_client.ttl(keys.program_meta(namespace, "s1", "qa")) <= 1
    time.sleep(1.3)
    assert store.current_version("s1", "qa") == 0
    assert store.list("s1") == []
