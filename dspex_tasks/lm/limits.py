"""Rate-limit arithmetic with no Redis: the limits a spec gives, the GCRA reference, token estimates.

Kept apart from :mod:`.ratelimit` (the Redis limiter) so that settings can validate ``DSPEX_RATE_LIMITS``
without importing the limiter or opening anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Unit", "Limit", "parse_limits", "gcra_reserve", "estimate_tokens", "MAX_BACKOFF_S", "BACKOFF_JITTER",
           "backoff_s", "DEFAULT_MAX_QUEUE_S", "DEFAULT_MAX_COUNTDOWN_S"]

#: In-thread backoff never holds a thread longer (the task's own retries wait longer).
MAX_BACKOFF_S = 4.0
#: The in-thread backoff is multiplied by a uniform factor in this range.
BACKOFF_JITTER = (0.8, 1.2)
#: A task waits at most this long for fleet rate-limit slots, re-queued (``DSPEX_RATE_LIMIT_MAX_QUEUE_S``).
DEFAULT_MAX_QUEUE_S = 3600.0
#: The longest countdown a task re-queued for its slot is given (``DSPEX_RATE_LIMIT_MAX_COUNTDOWN_S``): with
#: the default wait budget, at most two re-queues per task however long the backlog.
DEFAULT_MAX_COUNTDOWN_S = 1800.0


def backoff_s(base_s: float, attempt: int) -> float:
    """The in-thread delay before retry ``attempt + 1``, before jitter: ``base_s * 2**attempt``, at most
    :data:`MAX_BACKOFF_S` (what ``lm.governed.retry_delay`` sleeps and ``Settings.longest_lm_call_s`` budgets)."""
    return float(min(base_s * (2 ** min(attempt, 8)), MAX_BACKOFF_S))

Unit = Literal["requests", "tokens"]
_RATES: dict[str, tuple[Unit, float]] = {"rpm": ("requests", 60.0), "rps": ("requests", 1.0),
                                          "tpm": ("tokens", 60.0), "tps": ("tokens", 1.0)}
_BURSTS: dict[str, Unit] = {"burst": "requests", "token_burst": "tokens"}




@dataclass(frozen=True)
class Limit:
    """One bucket: ``rate`` units per second with a capacity of ``burst`` units."""

    scope: str
    unit: Unit
    rate: float
    burst: float

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.rate

    @property
    def tolerance_ms(self) -> float:
        return self.burst * self.interval_ms

    def tolerance(self, jitter_ms: float = 0.0) -> float:
        """The bucket depth in ms, less what is kept back for send delays (never below 0)."""
        return max(self.tolerance_ms - jitter_ms, 0.0)

    def max_in_window(self, window_s: float) -> float:
        """The most units this bucket admits in any window of ``window_s`` seconds."""
        return self.burst + self.rate * window_s


def parse_limits(spec: Mapping[str, Any], scope: str) -> list[Limit]:
    """Parse ``{"rpm"|"rps": n, "tpm"|"tps": n, "burst": n, "token_burst": n}`` into buckets.

    ``burst`` defaults to one second's worth of the rate (at least 1 request).

    Raises:
        ValueError: naming the scope and the bad key or value.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"rate limit for {scope} must be an object like {{\"rpm\": 60}}, got {spec!r}")
    unknown = sorted(set(spec) - set(_RATES) - set(_BURSTS))
    if unknown:
        raise ValueError(f"unknown rate-limit key(s) {unknown} for {scope}; expected rpm, rps, tpm, tps, burst, "
                         "token_burst")
    rates: dict[Unit, float] = {}
    for name, (unit, per_s) in _RATES.items():
        if name not in spec:
            continue
        value = _number(spec[name], name, scope)
        if value <= 0:
            raise ValueError(f"rate limit {name} for {scope} must be > 0, got {value}")
        if unit in rates:
            raise ValueError(f"rate limit for {scope} gives {unit} twice (per second and per minute)")
        rates[unit] = value / per_s
    limits = []
    for name, unit in _BURSTS.items():
        if name in spec and unit not in rates:
            raise ValueError(f"rate limit for {scope} sets {name} without a {unit} rate")
    for unit, rate in rates.items():
        burst_key = "burst" if unit == "requests" else "token_burst"
        default = max(1.0, float(math.floor(rate))) if unit == "requests" else max(1.0, rate)
        burst = _number(spec.get(burst_key, default), burst_key, scope)
        if burst < 1:
            raise ValueError(f"rate limit {burst_key} for {scope} must be >= 1, got {burst}")
        limits.append(Limit(scope, unit, rate, burst))
    return limits


def gcra_reserve(tats: dict[str, float], now_ms: float, wants: Sequence[tuple[str, Limit, float]],
                 max_wait_ms: float, jitter_ms: float = 0.0) -> tuple[bool, float]:
    """The acquire script's arithmetic in Python (the reference its tests check): ``tats`` maps bucket
    names to theoretical arrival times in ms and is updated in place when the call is reserved.

    Args:
        tats: Bucket state.
        now_ms: The clock.
        wants: ``(bucket name, limit, cost)`` per bucket the call needs.
        max_wait_ms: Reserve only if the call can start within this.
        jitter_ms: Burst kept in reserve for send delays (see the module docstring).

    Returns:
        ``(reserved, wait_ms)``.
    """
    send = now_ms
    for name, limit, cost in wants:
        send = max(send, tats.get(name, now_ms) + cost * limit.interval_ms - limit.tolerance(jitter_ms))
    wait = send - now_ms
    if wait > max_wait_ms:
        return False, wait
    for name, limit, cost in wants:
        tats[name] = max(tats.get(name, now_ms), send) + cost * limit.interval_ms
    return True, wait


def _number(value: Any, name: str, scope: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"rate limit {name} for {scope} must be a number, got {value!r}")
    return float(value)


def estimate_tokens(prompt: Any, messages: Any, max_tokens: Any) -> int:
    """A pre-call token estimate: prompt characters / 4 plus ``max_tokens`` (or 256) for the answer."""
    chars = len(str(prompt or ""))
    for m in messages or ():
        content = m.get("content") if isinstance(m, Mapping) else m
        chars += len(content) if isinstance(content, str) else len(str(content))
    answer = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 256
    return chars // 4 + answer

