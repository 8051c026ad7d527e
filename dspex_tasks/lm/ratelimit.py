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
in-thread until it. A task's call further back in line reserves its slot all the same, however far
back (first come, first served), raises :class:`RateLimited` carrying it, and the task re-queues
itself (a Celery retry, not a held thread) with a countdown that brings it back 90% of an in-thread
wait before the slot: one re-queue per task, or one per ``DSPEX_RATE_LIMIT_MAX_COUNTDOWN_S`` of wait
(a re-queued message is held by a worker until its countdown, so no countdown is longer than that,
nor than half of ``DSPEX_VISIBILITY_TIMEOUT_S``). The wait is bounded by time, not by count: no slot is
reserved further ahead than ``DSPEX_RATE_LIMIT_MAX_QUEUE_S`` (an hour); a task that finds a longer
backlog ahead of it reserves nothing and fails at once with :class:`~dspex_tasks.errors.LMRateLimitError`.
(The bound is on the line, not on the time since the task was first turned away: a task whose worker
died holding it comes back after the visibility timeout, and must not fail for that.)

The reservation is kept in Redis per task id and call (the task's n-th LM call in a run), so a task
that asks again (back early, or its message delivered twice: its worker died, or the visibility
timeout passed) gets the same slot without taking another unit; and a slot is sent once: the first
copy of the task to redeem it marks it sent, a second copy needs a unit of its own. A slot redeemed
later than ``jitter_s`` after its time is dropped (never sent late into a later window) and a new
one reserved. Calls made outside a task (a map item, an optimizer's threads) claim the slot they
were given (:func:`claim`) and wait for it in their thread.

Token limits reserve an estimate (prompt characters / 4 plus ``max_tokens`` or 256) before the
call and settle to the provider's reported total after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from .. import keys
from ..connections import register_lua
from ..errors import LMRateLimitError, RateLimited
from ..wire import REQUEUE_HEADER, SLOT_HEADER
from ..wire import header as _header
from .limits import DEFAULT_MAX_COUNTDOWN_S, DEFAULT_MAX_QUEUE_S, Limit, estimate_tokens, gcra_reserve, parse_limits

__all__ = ["Limit", "RateLimited", "RateLimiter", "parse_limits", "gcra_reserve", "requeue", "lm_retries", "requeues",
           "claim", "claim_from", "estimate_tokens", "REQUEUE_HEADER", "SLOT_HEADER", "DEFAULT_MAX_QUEUE_S",
           "DEFAULT_MAX_COUNTDOWN_S"]

log = logging.getLogger(__name__)

#: How long a call's reservation outlives its slot (then a task asking again reserves a new one anyway).
RESERVATION_LIFE_S = 60.0
# The acquire script's answers (lua/ratelimit_acquire.lua)
_NONE, _RESERVED, _CLAIMED, _DUE, _EARLY = 0, 1, 2, 3, 4


class RateLimiter:
    """Acquires slots in Redis buckets (thread-safe; one round trip per call).

    Args:
        redis: A ``redis.Redis`` client.
        namespace: The key namespace.
        max_wait_s: The longest wait served in-thread; longer raises :class:`RateLimited`.
        max_queue_s: How far ahead a slot is reserved for a call outside a task (a task's own bound,
            ``DSPEX_RATE_LIMIT_MAX_QUEUE_S``, comes with it: :func:`claim_from`).
        jitter_s: Burst kept in reserve for the delay between a slot and the request's arrival.
        sleep: Injected for tests.
    """

    def __init__(self, redis: Any, namespace: str, *, max_wait_s: float = 1.0,
                 max_queue_s: float = DEFAULT_MAX_QUEUE_S, jitter_s: float = 0.1,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.redis = redis
        self.namespace = namespace
        self.max_wait_s = max_wait_s
        self.max_queue_s = max(max_queue_s, max_wait_s)
        self.jitter_ms = 1000.0 * jitter_s
        self._sleep = sleep
        self._acquire = register_lua(redis, __name__, "ratelimit_acquire")
        self._adjust = register_lua(redis, __name__, "ratelimit_adjust")

    def _key(self, limit: Limit) -> str:
        return keys.ratelimit_bucket(self.namespace, limit.scope, limit.unit)

    def _held_key(self, task_id: str, call: int) -> str:
        # In the buckets' hash tag: the script touches both (one Redis Cluster slot).
        return keys.ratelimit_reservation(self.namespace, task_id, call)

    @staticmethod
    def _cost(limit: Limit, tokens: float) -> float:
        return 1.0 if limit.unit == "requests" else min(max(float(tokens), 0.0), limit.burst)

    def _call(self, limits: Sequence[Limit], tokens: float, within_s: float, *, slot_at: float = 0.0,
              held: str | None = None) -> tuple[int, float, float, str]:
        bucket_keys: list[str] = []
        triples: list[float] = []
        for limit in limits:
            cost = self._cost(limit, tokens)
            if cost > 0:
                bucket_keys.append(self._key(limit))
                triples += [limit.interval_ms, limit.tolerance(self.jitter_ms), cost]
        if not bucket_keys:
            return _RESERVED, 0.0, 0.0, ""
        joined = "|".join(bucket_keys)
        life_ms = 1000.0 * RESERVATION_LIFE_S if held else 0.0
        args: list[float | str] = [1000.0 * max(within_s, 0.0), slot_at, life_ms, 1000.0 * self.max_wait_s,
                                   self.jitter_ms, joined, *triples]
        status, wait_ms, now_ms = self._acquire(keys=bucket_keys + ([held] if held else []), args=args)
        return int(status), float(wait_ms), float(now_ms), joined

    def try_acquire(self, limits: Sequence[Limit], *, tokens: float = 0.0,
                    max_wait_s: float | None = None) -> tuple[bool, float]:
        """Reserve one request and ``tokens`` in every bucket if they can start within ``max_wait_s``.

        Returns:
            ``(reserved, wait_s)``: when reserved, the call may start after ``wait_s``; otherwise
            nothing was reserved and ``wait_s`` is how long until it could be.
        """
        status, wait_ms, _, _ = self._call(limits, tokens, self.max_wait_s if max_wait_s is None else max_wait_s)
        return status == _RESERVED, max(wait_ms, 0.0) / 1000.0

    def acquire(self, limits: Sequence[Limit], *, tokens: float = 0.0, what: str = "", sleep: bool = True) -> float:
        """Redeem this call's slot or reserve one, and sleep until it; returns the seconds slept.

        ``sleep=False`` returns the seconds to wait without sleeping (a coroutine sleeps on its loop).

        Raises:
            RateLimited: the slot is further away than ``max_wait_s`` (it carries the slot: the task comes
                back for it); or, with no slot (``slot`` None), there is none within the task's
                ``DSPEX_RATE_LIMIT_MAX_QUEUE_S``.
        """
        task = _current_task()
        if task is not None:
            return self._acquire_for(task, limits, tokens, what, sleep)
        claimed = _claimed.get()
        slot_key = "|".join(self._key(lim) for lim in limits if self._cost(lim, tokens) > 0)
        if claimed is not None and claimed.get("key") == slot_key:
            _claimed.set(None)
            at = float(claimed.get("at") or 0)
            _, wait_ms, _, _ = self._call(limits, tokens, 0.0, slot_at=at)
            if -self.jitter_ms <= wait_ms <= 1000.0 * self.max_wait_s:
                return self._wait(wait_ms, sleep)
            if wait_ms > 0:  # back too early: go round again for the same slot
                log.debug("rate-limit slot on %s: back %.0f ms early", what, wait_ms)
                raise RateLimited(self._return_in(wait_ms), f"early for the slot on {what}", False, claimed)
            # too late: the slot is gone (sending now could crowd a later window); take a new one
            log.info("rate-limit slot on %s redeemed %.0f ms late; dropped", what, -wait_ms)
        status, wait_ms, now_ms, key = self._call(limits, tokens, self.max_queue_s)
        return self._answer(status, wait_ms, {"key": key, "at": now_ms + wait_ms}, limits, what, sleep)

    def _acquire_for(self, task: _Queued, limits: Sequence[Limit], tokens: float, what: str, sleep: bool) -> float:
        call = task.calls
        task.calls += 1
        status, wait_ms, now_ms, key = self._call(limits, tokens, task.max_queue_s,
                                                  held=self._held_key(task.task_id, call))
        if status == _DUE:
            return self._wait(wait_ms, sleep)
        slot = {"key": key, "at": now_ms + wait_ms, "call": call}
        if status == _EARLY:  # back before its slot (a capped countdown, or delivered twice): same slot
            log.debug("rate-limit slot on %s: task %s back %.0f ms early", what, task.task_id, wait_ms)
            raise RateLimited(self._return_in(wait_ms), f"early for the slot on {what}", False, slot)
        return self._answer(status, wait_ms, slot, limits, what, sleep)

    def _answer(self, status: int, wait_ms: float, slot: dict[str, Any], limits: Sequence[Limit], what: str,
                sleep: bool = True) -> float:
        if status == _RESERVED and wait_ms <= 1000.0 * self.max_wait_s:
            return self._wait(wait_ms, sleep)
        scopes = ", ".join(sorted({f"{lim.scope} {lim.unit}" for lim in limits}))
        message = f"rate limit {scopes} full{' for ' + what if what else ''}; next slot in {wait_ms / 1000:.2f}s"
        if status == _RESERVED:  # reserved ahead: come back for it
            raise RateLimited(self._return_in(wait_ms), message, False, slot)
        raise RateLimited(wait_ms / 1000.0, f"{message}, past the wait allowed (DSPEX_RATE_LIMIT_MAX_QUEUE_S)")

    def _return_in(self, wait_ms: float) -> float:
        # Back 90% of an in-thread wait before the slot: a re-queued task may run late by that much.
        return max(wait_ms / 1000.0 - 0.9 * self.max_wait_s, 0.0)

    def _wait(self, wait_ms: float, sleep: bool = True) -> float:
        wait = max(wait_ms, 0.0) / 1000.0
        if wait > 0 and sleep:
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


@dataclass
class _Queued:
    """The task this context's LM calls belong to: its id, how far ahead its slots may be, and how many LM
    calls this run of it has made (a call's reservation is the task's n-th)."""

    task_id: str
    max_queue_s: float
    calls: int = 0


_claimed: ContextVar[dict[str, Any] | None] = ContextVar("dspex_rate_limit_slot", default=None)
_queued: ContextVar[_Queued | None] = ContextVar("dspex_rate_limit_task", default=None)


def claim(slot: Any) -> None:
    """Make ``slot`` (from :attr:`RateLimited.slot`) this context's to redeem; None clears it. Either way the
    context's calls no longer belong to a task (:func:`claim_from` makes them a task's).

    Call it (or :func:`claim_from`) at the start of every task or item: a pool thread must not keep a
    previous one's slot.
    """
    _claimed.set(slot if isinstance(slot, dict) and "key" in slot and "at" in slot else None)
    _queued.set(None)


def claim_from(request: Any, *, max_queue_s: float = DEFAULT_MAX_QUEUE_S) -> None:
    """Make this context's LM calls those of the task ``request`` runs: their slots are reserved in Redis under
    its id (so a second delivery of its message finds them), at most ``max_queue_s`` ahead.

    Call it at the start of every task (a pool thread must not keep a previous task's calls).
    """
    claim(_header(request, SLOT_HEADER))
    task_id = getattr(request, "id", None)
    if isinstance(task_id, str) and task_id:
        _queued.set(_Queued(task_id, max_queue_s))


def _current_task() -> _Queued | None:
    task = _queued.get()
    if task is None:
        return None
    from celery import current_task  # a stale context (a pool thread now runs another task) is no task's

    running = current_task.request.id if current_task else None
    return task if running is None or running == task.task_id else None


def _since(slot: Any) -> float | None:
    since = slot.get("since") if isinstance(slot, dict) else None
    return float(since) if isinstance(since, int | float) and not isinstance(since, bool) else None


# -- the task side: re-queue with a countdown, on a budget of its own -------------------------
def requeues(request: Any) -> int:
    """How many times this task was re-queued for a full bucket (a message header)."""
    try:
        return max(int(_header(request, REQUEUE_HEADER) or 0), 0)
    except (TypeError, ValueError):
        return 0


def lm_retries(request: Any) -> int:
    """Retries this task spent on LM errors: Celery's count minus the rate-limit re-queues."""
    return max(int(getattr(request, "retries", 0) or 0) - requeues(request), 0)


def requeue(task: Any, exc: RateLimited, *, max_retries: int, max_queue_s: float = DEFAULT_MAX_QUEUE_S,
            max_countdown_s: float = DEFAULT_MAX_COUNTDOWN_S, visibility_timeout_s: float | None = None,
            ) -> BaseException:
    """What a task raises for ``exc``: a Celery ``Retry`` with the countdown, or an LMRateLimitError past the bound.

    A slot in a full fleet bucket is waited for however many re-queues that takes, each countdown at most
    ``max_countdown_s`` and half of ``visibility_timeout_s`` (a worker holds a re-queued message until its
    countdown; a Redis broker would deliver it again past its visibility timeout); with no slot within
    ``max_queue_s`` (the limiter reserved none) the task fails. The message header keeps when a full bucket
    first turned the task away (``since``, for the failure's text). A provider's long ``Retry-After`` spends
    the task's ordinary LM retry budget (``max_retries``).
    """
    request = task.request
    done = requeues(request)
    since = _since(_header(request, SLOT_HEADER))
    slot: dict[str, Any] | None = {"since": since} if since is not None else None
    countdown = exc.countdown_s
    if exc.provider:
        if lm_retries(request) >= max_retries:
            return LMRateLimitError(f"LM call failed (LMRateLimitError): provider still rate limiting after "
                                    f"{lm_retries(request)} task retries: {exc.message}")
        count = done
    else:
        now = time.time()
        since = now if since is None else since
        if exc.slot is None and countdown > max_queue_s:
            return LMRateLimitError(f"fleet rate limit: no slot within DSPEX_RATE_LIMIT_MAX_QUEUE_S={max_queue_s:g}s "
                                    f"(the task waited {now - since:.0f}s, {done} re-queues): {exc.message}")
        cap = max_countdown_s if visibility_timeout_s is None else min(max_countdown_s, visibility_timeout_s / 2)
        countdown = min(countdown, max(cap, 0.0))
        slot = {**(exc.slot or {}), "since": since}
        count = done + 1
    headers = dict(request.headers) if isinstance(getattr(request, "headers", None), dict) else {}
    headers[REQUEUE_HEADER] = count
    headers[SLOT_HEADER] = slot
    retry: BaseException = task.retry(countdown=countdown, headers=headers, throw=False)
    return retry
