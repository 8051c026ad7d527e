"""A shared LM response cache in Redis: one fleet-wide memory of answered requests.

Entries are keyed on a SHA-256 of the full request (route, messages and generation
parameters; never ``api_key``, ``api_base`` or other client settings), hold JSON only (the
answer's choices, usage and serving model; nothing is pickled), expire after
``DSPEX_LM_CACHE_TTL_S``, and are bounded by ``DSPEX_LM_CACHE_MAX_ENTRIES``: a sorted-set index
by store time evicts the oldest first. Lookups and stores are one Lua script each (one round
trip), and count hits, misses, stores and evictions in a Redis hash (:func:`cache_stats`).

Opt in per signature (``signature(..., cache=True)``) or for all (``DSPEX_LM_SHARED_CACHE=1``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from .. import keys
from ..connections import register_lua

__all__ = ["LMCache", "cache_stats", "request_digest", "entry_from_response", "IGNORED_PARAMS"]

# Client settings and transport knobs: they never change the answer and may be secret.
IGNORED_PARAMS = frozenset({
    "api_key", "api_base", "base_url", "api_version", "organization", "project", "headers", "extra_headers",
    "timeout", "num_retries", "cache", "azure_ad_token_provider", "user",
})




def _json_default(value: Any) -> Any:
    """JSON for what ``json`` cannot encode (pydantic response formats as their schema)."""
    schema = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(schema):
        return {"__schema__": schema()}
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump()
    if isinstance(value, Mapping):
        return dict(value)
    return repr(value)


def request_digest(route: str, prompt: Any, messages: Any, params: Mapping[str, Any]) -> str:
    """SHA-256 hex of a request: the route, the prompt or messages, and every answer-shaping parameter."""
    body = {"route": route, "prompt": prompt, "messages": messages,
            "params": {k: v for k, v in params.items() if k not in IGNORED_PARAMS and v is not None}}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump())
    raise TypeError(f"not JSON data: {type(value).__name__}")


def entry_from_response(raw: Any, model: str) -> dict[str, Any] | None:
    """The JSON record stored for an OpenAI-shaped response; None when it should not be cached."""
    try:
        choices = []
        for i, choice in enumerate(_field(raw, "choices") or []):
            message = _field(choice, "message")
            if message is None:
                return None
            kept = {"role": "assistant", "content": _plain(_field(message, "content"))}
            for extra in ("tool_calls", "reasoning_content"):
                value = _field(message, extra)
                if value:
                    kept[extra] = _plain(value)
            choices.append({"index": i, "finish_reason": _field(choice, "finish_reason") or "stop", "message": kept})
        if not choices:
            return None
        usage = _plain(dict(_field(raw, "usage") or {}))
    except (TypeError, ValueError):
        return None
    return {"model": model, "choices": choices, "usage": usage, "created": int(time.time())}


class LMCache:
    """The shared cache (thread-safe; one round trip per lookup and per store).

    Args:
        redis: A ``redis.Redis`` client.
        namespace: The key namespace.
        ttl_s: Entry lifetime.
        max_entries: Past this many entries the oldest are evicted.
    """

    def __init__(self, redis: Any, namespace: str, *, ttl_s: float, max_entries: int) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        self.max_entries = max(int(max_entries), 1)
        self._get = register_lua(redis, __name__, "cache_get")
        self._put = register_lua(redis, __name__, "cache_put")
        self._index = keys.lm_cache_index(namespace)
        self._stats = keys.lm_cache_stats(namespace)

    def get(self, digest: str) -> dict[str, Any] | None:
        """The stored entry for ``digest`` (counted as a hit or a miss), or None."""
        raw = self._get(keys=[keys.lm_cache_entry(self.namespace, digest), self._stats])
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        return entry if isinstance(entry, dict) and entry.get("choices") else None

    def put(self, digest: str, entry: Mapping[str, Any]) -> int:
        """Store ``entry``; returns how many old entries were evicted."""
        value = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
        evicted = self._put(keys=[keys.lm_cache_entry(self.namespace, digest), self._index, self._stats],
                            args=[value, self.ttl_ms, self.max_entries])
        return int(evicted or 0) if int(evicted or 0) > 0 else 0


def cache_stats(redis: Any, namespace: str) -> dict[str, int]:
    """Fleet-wide counters for metrics: hits, misses, stores, evictions, and the live entry count."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.lm_cache_stats(namespace))
    pipe.zcard(keys.lm_cache_index(namespace))
    raw, entries = pipe.execute()
    stats = {"hits": 0, "misses": 0, "stores": 0, "evictions": 0}
    for k, v in (raw or {}).items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        stats[name] = int(v)
    stats["entries"] = int(entries or 0)
    return stats
