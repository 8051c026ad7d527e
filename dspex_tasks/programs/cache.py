"""The per-process program cache: warm DSPy modules keyed by (session, program, version).

The warm path touches Redis at most once per ``verify_s`` per key (one HGET of
the current version); a pub/sub listener drops stale entries as soon as a
``put``/``rollback``/``delete`` happens anywhere, and the periodic version check
is the safety net for notices lost while the listener reconnects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ProgramNotFound
from .store import ProgramRecord, ProgramStoreProtocol

__all__ = ["ProgramCache", "CacheStats"]

log = logging.getLogger(__name__)

Builder = Callable[[str, ProgramRecord | None], Any]


@dataclass
class _Entry:
    version: int
    module: Any
    verified_at: float


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0
    size: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "invalidations": self.invalidations, "size": self.size}


class ProgramCache:
    """A bounded LRU of warm program modules.

    Args:
        store: where program state lives.
        build: ``build(program_name, record_or_None) -> module``; ``None`` means the
            signature's base program (nothing stored for the session).
        max_size: entries kept before the least recently used is dropped.
        verify_s: how long an entry is trusted before its version is re-checked.
    """

    def __init__(self, store: ProgramStoreProtocol, build: Builder, *, max_size: int = 1024,
                 verify_s: float = 1.0) -> None:
        self.store = store
        self.build = build
        self.max_size = max_size
        self.verify_s = verify_s
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def get(self, session: str, program: str) -> tuple[Any, int]:
        """The warm module for (session, program) and the version it serves."""
        key = (session, program)
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            self._used[session] = time.time()
        if entry is not None and now - entry.verified_at < self.verify_s:
            self.stats.hits += 1
            return entry.module, entry.version
        current = self.store.current_version(session, program)
        if entry is not None and entry.version == current:
            entry.verified_at = now
            self.stats.hits += 1
            return entry.module, entry.version
        self.stats.misses += 1
        return self._load(session, program, current)

    def _load(self, session: str, program: str, version: int) -> tuple[Any, int]:
        record: ProgramRecord | None = None
        if version:
            try:
                record = self.store.get(session, program, version)
            except ProgramNotFound:  # deleted between the two reads: serve the base program
                version = 0
        module = self.build(program, record)
        self._insert(session, program, version, module)
        return module, version

    def _insert(self, session: str, program: str, version: int, module: Any) -> None:
        with self._lock:
            self._entries[(session, program)] = _Entry(version, module, time.monotonic())
            self._entries.move_to_end((session, program))
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
                self.stats.evictions += 1
            self.stats.size = len(self._entries)

    def invalidate(self, session: str, program: str, version: int | None = None) -> None:
        """Drop the entry unless it already serves ``version``."""
        with self._lock:
            entry = self._entries.get((session, program))
            if entry is not None and entry.version != version:
                del self._entries[(session, program)]
                self.stats.invalidations += 1
                self.stats.size = len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.stats.size = 0

    def prewarm(self, sessions: list[str], programs_of: Callable[[str], list[str]]) -> int:
        """Load the given sessions' stored programs; returns how many were loaded."""
        loaded = 0
        for session in sessions:
            for program in programs_of(session):
                if len(self._entries) >= self.max_size:
                    return loaded
                try:
                    self._load(session, program, self.store.current_version(session, program))
                    loaded += 1
                except Exception as exc:  # a bad stored program must not stop the worker starting
                    log.warning("prewarm of %s/%s failed: %s", session, program, exc)
        return loaded

    def take_used(self) -> dict[str, float]:
        with self._lock:
            used, self._used = self._used, {}
        return used

    # -- background: pub/sub invalidation and batched use times ---------------
    def start_listener(self, redis: Any, channel: str, *, on_tick: Callable[[], None] | None = None,
                       tick_s: float = 5.0, on_reconnect: Callable[[], object] | None = None) -> None:
        """Follow ``channel`` in a daemon thread, reconnecting with backoff.

        ``on_tick`` runs every ``tick_s``; ``on_reconnect`` after each reconnection (not the first connection),
        when Redis may have restarted and lost its data.
        """
        t = threading.Thread(target=self._listen, args=(redis, channel, on_tick, tick_s, on_reconnect),
                             name="dspex-cache-listener", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def _listen(self, redis: Any, channel: str, on_tick: Callable[[], None] | None, tick_s: float,
                on_reconnect: Callable[[], object] | None = None) -> None:
        backoff = 0.1
        next_tick = time.monotonic() + tick_s
        connected_before = False
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                # Anything published while we were away is unknown: re-verify everything.
                self._expire_all()
                if connected_before and on_reconnect is not None:
                    on_reconnect()
                connected_before = True
                backoff = 0.1
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        self._on_message(msg["data"])
                    if on_tick is not None and time.monotonic() >= next_tick:
                        next_tick = time.monotonic() + tick_s
                        on_tick()
            except Exception as exc:
                log.warning("program cache listener lost its connection (%s); retrying", exc)
                self._expire_all()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a dead connection
                        pubsub.close()

    def _on_message(self, data: Any) -> None:
        try:
            notice = json.loads(data)
            self.invalidate(notice["session"], notice["program"], int(notice["version"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed program notice %r: %s", data, exc)

    def _expire_all(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                entry.verified_at = 0.0
