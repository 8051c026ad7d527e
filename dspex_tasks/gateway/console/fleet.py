"""The fleet page's data: ``dspex status``'s model (:func:`~dspex_tasks.observability.status.collect_status`:
workers, queue depths and consumers, program cache and task counters), plus each Redis queue's oldest message
age (as ``dspex health`` reads it), the LM response cache's counters and the fleet-wide LM rate-limit buckets.

A bucket (:mod:`dspex_tasks.lm.ratelimit`) is one GCRA theoretical arrival time in milliseconds: how far it is
ahead of Redis's clock is the time booked ahead (a new call waits only for what exceeds the limit's burst); a
bucket nobody used lately has expired and is not listed.
"""

from __future__ import annotations

from typing import Any

from ... import keys
from ...lm.cache import cache_stats
from ...observability.status import collect_status, oldest_queue_age
from ..state import Gateway

__all__ = ["fleet", "rate_buckets"]

_MAX_BUCKETS = 200


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def rate_buckets(redis: Any, namespace: str) -> list[dict[str, Any]]:
    """The LM rate-limit buckets in use: scope (``model:...`` or ``signature:...``), unit, time booked ahead (s)."""
    prefix = keys.ratelimit_bucket(namespace, "", "")[:-2]  # "<ns>:{#rl}:"
    names = []
    for key in redis.scan_iter(match=prefix + "*", count=500):
        name = _s(key)[len(prefix) + 1:]
        if not name.startswith("task:"):  # a task's held reservation, not a bucket
            names.append(name)
        if len(names) >= _MAX_BUCKETS:
            break
    if not names:
        return []
    secs, micros = redis.time()
    now_ms = int(secs) * 1000 + int(micros) / 1000
    values = redis.mget([f"{prefix}:{n}" for n in names])
    out = []
    for name, value in zip(names, values, strict=True):
        scope, _, unit = name.rpartition(":")
        try:
            tat = float(value) if value is not None else now_ms
        except ValueError:
            continue
        out.append({"scope": scope, "unit": unit, "ahead_s": round(max(0.0, tat - now_ms) / 1000, 3)})
    return sorted(out, key=lambda b: (b["scope"], b["unit"]))


def _rounded(age: float | None) -> float | None:
    return None if age is None else round(age, 3)


def fleet(gw: Gateway) -> dict[str, Any]:
    """Everything the fleet page shows (a second or so: workers are asked by broadcast)."""
    s = gw.settings
    status = collect_status(gw.client, timeout_s=1.0)
    redis = gw.client.redis
    ages: dict[str, float | None] = {}
    if s.broker_is_redis and s.broker == s.redis_url:
        ages = {q: _rounded(oldest_queue_age(redis, q)[0]) for q in status["queues"]}
    return {**status, "ages": ages, "lm_cache": cache_stats(redis, s.namespace),
            "buckets": rate_buckets(redis, s.namespace), "limits": s.rate_limits}
