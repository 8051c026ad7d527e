from __future__ import annotations

import time
from typing import Any

import pytest

from dspex_tasks.programs.cache import ProgramCache
from dspex_tasks.programs.store import MemoryProgramStore, ProgramRecord

pytestmark = pytest.mark.unit


class CountingStore(MemoryProgramStore):
    """The real in-memory store, counting reads so the warm path can be proven read-free."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def current_version(self, session: str, program: str) -> int:
        self.reads += 1
        return super().current_version(session, program)


def build(program: str, record: ProgramRecord | None) -> Any:
    return ("module", program, record.version if record else 0, record.state if record else None)


def test_warm_hits_do_not_touch_the_store() -> None:
    store = CountingStore()
    store.put("s", "qa", {"demos": [{"n": 1}]})
    cache = ProgramCache(store, build, verify_s=60)
    module, version = cache.get("s", "qa")
    assert version == 1 and module[3] == {"demos": [{"n": 1}]}
    reads = store.reads
    for _ in range(100):
        assert cache.get("s", "qa")[1] == 1
    assert store.reads == reads
    assert cache.stats.hits == 100 and cache.stats.misses == 1


def test_version_check_after_verify_window_picks_up_new_version() -> None:
    store = CountingStore()
    store.put("s", "qa", {"n": 1})
    cache = ProgramCache(store, build, verify_s=0.05)
    assert cache.get("s", "qa")[1] == 1
    store.put("s", "qa", {"n": 2})
    assert cache.get("s", "qa")[1] == 1  # still trusted inside the window
    time.sleep(0.06)
    module, version = cache.get("s", "qa")
    assert version == 2 and module[3] == {"n": 2}


def test_invalidate_drops_stale_entry_only() -> None:
    store = MemoryProgramStore()
    store.put("s", "qa", {"n": 1})
    cache = ProgramCache(store, build, verify_s=60)
    cache.get("s", "qa")
    cache.invalidate("s", "qa", 1)  # same version: kept
    assert cache.stats.invalidations == 0
    store.rollback("s", "qa", 1)
    store.put("s", "qa", {"n": 2})
    cache.invalidate("s", "qa", 2)
    assert cache.stats.invalidations == 1
    assert cache.get("s", "qa")[1] == 2


def test_session_without_program_serves_base_version_zero() -> None:
    cache = ProgramCache(MemoryProgramStore(), build, verify_s=60)
    module, version = cache.get("fresh", "qa")
    assert version == 0 and module[3] is None


def test_lru_bound_and_eviction_counter() -> None:
    store = MemoryProgramStore()
    cache = ProgramCache(store, build, max_size=3, verify_s=60)
    for i in range(10):
        cache.get(f"s{i}", "qa")
    assert cache.stats.size == 3 and cache.stats.evictions == 7
    cache.get("s9", "qa")
    assert cache.stats.hits == 1


def test_prewarm_loads_stored_programs() -> None:
    store = MemoryProgramStore()
    for i in range(5):
        store.put(f"s{i}", "qa", {"i": i})
    cache = ProgramCache(store, build, verify_s=60)
    assert cache.prewarm(store.sessions()[:3], store.list) == 3
    assert cache.stats.size == 3
