"""Fleet-wide LM rate limits: GCRA token buckets in Redis, shared by every worker process.

A limit is requests and/or tokens per second or minute for a model (``DSPEX_RATE_LIMITS``) or a
signature (``signature(..., rate_limit={"rpm": 60})``). Each is a GCRA bucket (the "virtual
scheduling" form of a token bucket): one Redis string per bucket holds its theoretical arrival
time, and one Lua script checks and reserves every bucket a call needs atomically, on Redis's
clock (so worker clocks never matter).

Guarantee: in any window of ``W`` seconds a bucket admits at most ``burst + rate * W`` units, so
with ``{"rpm": 60, "burst": 5}`` the provider sees at most 65 requests in any minute, however many
worker processes share the limit. A request reaches the provider a little after its slot (thread
wake-up, request building, a busy CPU), and unequal delays could crowd a window; so the limiter
keeps ``jitter_s`` (0.1 s) worth of the burst in reserve: the bound holds at the provider for
delays up to that, at the cost of ``rate * 0.1`` units of burst (0.1 request at 60 rpm).

A call that can start within ``DSPEX_RATE_LIMIT_MAX_WAIT_S`` (1 s) reserves its slot and sleeps
in-thread until it. A call further back in line (up to ``reserve_ahead_s``, 60 s) still reserves
its slot, raises :class:`RateLimited` carrying it, and the task re-queues itself (a Celery retry,
not a held thread) with a countdown that brings it back most of an in-thread wait before the slot,
which it then redeems: first come, first served, one re-queue per task. A slot redeemed later than ``jitter_s``
after its time is dropped (never sent late into a later window) and a new one acquired. Past the
horizon nothing is reserved and the countdown brings the task back when it is within it. These
re-queues have their own budget (``DSPEX_RATE_LIMIT_MAX_REQUEUES``), separate from the task's LM
retries (``DSPEX_TASK_MAX_RETRIES``).

Token limits reserve an estimate (prompt characters / 4 plus ``max_tokens`` or 256) before the
call and settle to the provider's reported total after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from .. import keys
from ..connections import register_lua
from ..errors import LMError, LMRateLimitError, RateLimited
from ..wire import REQUEUE_HEADER, SLOT_HEADER
from .limits import Limit, estimate_tokens, gcra_reserve, parse_limits, requeue_countdown

__all__ = ["Limit", "RateLimited", "RateLimiter", "parse_limits", "gcra_reserve", "requeue", "lm_retries", "requeues",
           "claim", "claim_from", "estimate_tokens", "requeue_countdown", "REQUEUE_HEADER", "SLOT_HEADER"]

log = logging.getLogger(__name__)


class RateLimiter:
    """Acquires slots in Redis buckets (thread-safe; one round trip per call).

    Args:
        redis: A ``redis.Redis`` client.
        namespace: The key namespace.
        max_wait_s: The longest wait served in-thread; longer raises :class:`RateLimited`.
        reserve_ahead_s: How far ahead a slot is reserved for a re-queued task.
        jitter_s: Burst kept in reserve for the delay between a slot and the request's arrival.
        sleep: Injected for tests.
    """

    def __init__(self, redis: Any, namespace: str, *, max_wait_s: float = 1.0, reserve_ahead_s: float = 60.0,
                 jitter_s: float = 0.1, sleep: Callable[[float], None] = time.sleep) -> None:
        self.redis = redis
        self.namespace = namespace
        self.max_wait_s = max_wait_s
        self.reserve_ahead_s = max(reserve_ahead_s, max_wait_s)
        self.jitter_ms = 1000.0 * jitter_s
        self._sleep = sleep
        self._acquire = register_lua(redis, __name__, "ratelimit_acquire")
        self._adjust = register_lua(redis, __name__, "ratelimit_adjust")

    def _key(self, limit: Limit) -> str:
        return keys.ratelimit_bucket(self.namespace, limit.scope, limit.unit)

    @staticmethod
    def _cost(limit: Limit, tokens: float) -> float:
        return 1.0 if limit.unit == "requests" else min(max(float(tokens), 0.0), limit.burst)

    def _call(self, limits: Sequence[Limit], tokens: float, within_s: float,
              slot_at: float = 0.0) -> tuple[int, float, float, str]:
        bucket_keys: list[str] = []
        args: list[float] = [1000.0 * within_s, slot_at]
        for limit in limits:
            cost = self._cost(limit, tokens)
            if cost > 0:
                bucket_keys.append(self._key(limit))
                args += [limit.interval_ms, limit.tolerance(self.jitter_ms), cost]
        if not bucket_keys:
            return 1, 0.0, 0.0, ""
        status, wait_ms, now_ms = self._acquire(keys=bucket_keys, args=args)
        return int(status), float(wait_ms), float(now_ms), "|".join(bucket_keys)

    def try_acquire(self, limits: Sequence[Limit], *, tokens: float = 0.0,
                    max_wait_s: float | None = None) -> tuple[bool, float]:
        """Reserve one request and ``tokens`` in every bucket if they can start within ``max_wait_s``.

        Returns:
            ``(reserved, wait_s)``: when reserved, the call may start after ``wait_s``; otherwise
            nothing was reserved and ``wait_s`` is how long until it could be.
        """
        status, wait_ms, _, _ = self._call(limits, tokens, self.max_wait_s if max_wait_s is None else max_wait_s)
        return status == 1, max(wait_ms, 0.0) / 1000.0

    def acquire(self, limits: Sequence[Limit], *, tokens: float = 0.0, what: str = "") -> float:
        """Redeem this task's slot or reserve one, and sleep until it; returns the seconds slept.

        Raises:
            RateLimited: the slot is further away than ``max_wait_s`` (it carries the slot when one
                was reserved: the task comes back for it).
        """
        claimed = _claimed.get()
        slot_key = "|".join(self._key(lim) for lim in limits if self._cost(lim, tokens) > 0)
        if claimed is not None and claimed.get("key") == slot_key:
            _claimed.set(None)
            at = float(claimed.get("at") or 0)
            _, wait_ms, _, _ = self._call(limits, tokens, 0.0, at)
            if -self.jitter_ms <= wait_ms <= 1000.0 * self.max_wait_s:
                return self._wait(wait_ms)
            if wait_ms > 0:  # back too early: go round again for the same slot
                log.debug("rate-limit slot on %s: back %.0f ms early", what, wait_ms)
                raise RateLimited(self._return_in(wait_ms), f"early for the slot on {what}", False, claimed)
            # too late: the slot is gone (sending now could crowd a later window); take a new one
            log.info("rate-limit slot on %s redeemed %.0f ms late; dropped", what, -wait_ms)
        status, wait_ms, now_ms, key = self._call(limits, tokens, self.reserve_ahead_s)
        if status == 1 and wait_ms <= 1000.0 * self.max_wait_s:
            return self._wait(wait_ms)
        scopes = ", ".join(sorted({f"{lim.scope} {lim.unit}" for lim in limits}))
        message = f"rate limit {scopes} full{' for ' + what if what else ''}; next slot in {wait_ms / 1000:.2f}s"
        if status == 1:  # reserved ahead: come back for it
            raise RateLimited(self._return_in(wait_ms), message, False, {"key": key, "at": now_ms + wait_ms})
        raise RateLimited(requeue_countdown(wait_ms / 1000.0 - self.reserve_ahead_s), message)

    def _return_in(self, wait_ms: float) -> float:
        # Back 90% of an in-thread wait before the slot: a re-queued task may run late by that much.
        return max(wait_ms / 1000.0 - 0.9 * self.max_wait_s, 0.0)

    def _wait(self, wait_ms: float) -> float:
        wait = max(wait_ms, 0.0) / 1000.0
        if wait > 0:
            self._sleep(wait)
        return wait

    def settle(self, limits: Sequence[Limit], *, estimated: float, actual: float) -> None:
        """Correct token buckets by ``actual - estimated`` tokens (a refund when negative)."""
        for limit in limits:
            if limit.unit != "tokens":
                continue
            delta = self._cost(limit, actual) - self._cost(limit, estimated)
            if delta:
                self._adjust(keys=[self._key(limit)], args=[delta * limit.interval_ms, limit.tolerance(self.jitter_ms)])


_claimed: ContextVar[dict[str, Any] | None] = ContextVar("dspex_rate_limit_slot", default=None)


def claim(slot: Any) -> None:
    """Make ``slot`` (from :attr:`RateLimited.slot`) this context's to redeem; None clears it.

    Call it at the start of every task (a pool thread must not keep a previous task's slot).
    """
    _claimed.set(slot if isinstance(slot, dict) and "key" in slot and "at" in slot else None)


def claim_from(request: Any) -> None:
    """:func:`claim` the slot a re-queued task's message carries (its ``dspex_rl_slot`` header)."""
    headers = getattr(request, "headers", None)
    claim(headers.get(SLOT_HEADER) if isinstance(headers, dict) else getattr(request, SLOT_HEADER, None))


# -- the task side: re-queue with a countdown, on a budget of its own -------------------------
def requeues(request: Any) -> int:
    """How many times this task was re-queued for a full bucket (a message header)."""
    headers = getattr(request, "headers", None)
    value = headers.get(REQUEUE_HEADER) if isinstance(headers, dict) else None
    if value is None:
        value = getattr(request, REQUEUE_HEADER, None)
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0


def lm_retries(request: Any) -> int:
    """Retries this task spent on LM errors: Celery's count minus the rate-limit re-queues."""
    return max(int(getattr(request, "retries", 0) or 0) - requeues(request), 0)


def requeue(task: Any, exc: RateLimited, *, max_requeues: int, max_retries: int) -> BaseException:
    """What a task raises for ``exc``: a Celery ``Retry`` with the countdown, or an LMError past the budget.

    A full fleet bucket spends the re-queue budget (``max_requeues``); a provider's long
    ``Retry-After`` spends the task's ordinary LM retry budget (``max_retries``).
    """
    request = task.request
    done = requeues(request)
    if exc.provider:
        if lm_retries(request) >= max_retries:
            return LMRateLimitError(f"LM call failed (LMRateLimitError): provider still rate limiting after "
                           f"{lm_retries(request)} task retries: {exc.message}")
        count = done
    else:
        if done >= max_requeues:
            return LMError(f"fleet rate limit still full after {done} re-queues "
                           f"(DSPEX_RATE_LIMIT_MAX_REQUEUES): {exc.message}")
        count = done + 1
    headers = dict(request.headers) if isinstance(getattr(request, "headers", None), dict) else {}
    headers[REQUEUE_HEADER] = count
    headers[SLOT_HEADER] = exc.slot
    retry: BaseException = task.retry(countdown=exc.countdown_s, headers=headers, throw=False)
    return retry
