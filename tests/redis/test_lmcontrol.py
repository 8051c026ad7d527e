"""Layer 2: the rate limiter, the shared LM cache and usage aggregation against a real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex_tasks import keys
from dspex_tasks.cli.usage import collect_usage
from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.lm.cache import LMCache, cache_stats
from dspex_tasks.lm.ratelimit import Limit, RateLimited, RateLimiter, claim, parse_limits
from dspex_tasks.lm.usage import TaskUsage, UsageLedger, usage_report, usage_totals

pytestmark = pytest.mark.redis


def _max_in_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max((sum(1 for s in times[i:] if s < t + window_s) for i, t in enumerate(times)), default=0)


def test_bucket_is_atomic_under_threads(redis_client: Any, namespace: str) -> None:
    # Given a 20/s bucket with a burst of 4 and 24 threads hammering it (no waiting allowed)
    limiter = RateLimiter(redis_client, namespace, max_wait_s=0.0)
    (lim,) = parse_limits({"rps": 20, "burst": 4}, "sig:hammer")
    granted: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + 1.5

    def hammer() -> None:
        while time.monotonic() < stop:
            ok, _ = limiter.try_acquire([lim])
            if ok:
                with lock:
                    granted.append(time.monotonic())

    threads = [threading.Thread(target=hammer) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then what was granted never beats burst + rate x window, and the rate was actually used
    assert _max_in_window(granted, 0.5) <= lim.max_in_window(0.5) + 1  # +1: the client clock is not Redis's
    assert len(granted) <= lim.max_in_window(1.5) + 1
    assert len(granted) >= 20


def test_reservations_space_the_sends(redis_client: Any, namespace: str) -> None:
    # Given a 10/s bucket with burst 2 and a 1 s in-thread wait: callers sleep until their slot
    limiter = RateLimiter(redis_client, namespace, max_wait_s=1.0)
    (lim,) = parse_limits({"rps": 10, "burst": 2}, "sig:spaced")
    sends: list[float] = []
    limited: list[float] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            limiter.acquire([lim])
        except RateLimited as exc:
            with lock:
                limited.append(exc.countdown_s)
            return
        with lock:
            sends.append(time.monotonic())

    threads = [threading.Thread(target=call) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then ~burst + 10 start within the second, the rest are told to come back, and the sends are paced
    assert 11 <= len(sends) <= 13 and len(limited) == 30 - len(sends)
    assert all(c >= 0.0 for c in limited)
    assert _max_in_window(sends, 0.5) <= lim.max_in_window(0.5) + 1


def test_a_slot_reserved_ahead_is_redeemed_once_on_time(redis_client: Any, namespace: str) -> None:
    # Given a 2/s bucket (burst 1) and a caller further back than the 0.3 s in-thread wait
    limiter = RateLimiter(redis_client, namespace, max_wait_s=0.3, jitter_s=0.0)
    (lim,) = parse_limits({"rps": 2, "burst": 1}, "sig:slots")
    limiter.acquire([lim])
    with pytest.raises(RateLimited) as info:
        limiter.acquire([lim])  # ~0.5 s away: reserved ahead, comes back ~0.15 s before it
    slot = info.value.slot
    assert slot is not None and 0.15 < info.value.countdown_s < 0.3  # 0.5 s less 90% of 0.3 s
    # Early for it: told to come back again for the same slot, which stays reserved
    claim(slot)
    with pytest.raises(RateLimited) as early:
        limiter.acquire([lim])
    assert early.value.slot == slot
    assert limiter.try_acquire([lim], max_wait_s=0.3) == (False, pytest.approx(1.0, abs=0.1))
    # On time: redeemed without touching the bucket, and only once
    time.sleep(info.value.countdown_s)
    claim(slot)
    waited = limiter.acquire([lim])
    assert 0 <= waited <= 0.3
    with pytest.raises(RateLimited) as again:
        limiter.acquire([lim])  # no claim left: the next slot is a new one, 0.5 s after
    assert again.value.slot is not None and again.value.slot["at"] > slot["at"] + 400


def test_a_late_slot_is_dropped_not_sent(redis_client: Any, namespace: str) -> None:
    limiter = RateLimiter(redis_client, namespace, max_wait_s=0.0, jitter_s=0.0)
    (lim,) = parse_limits({"rps": 5, "burst": 1}, "sig:late")
    limiter.acquire([lim])
    with pytest.raises(RateLimited) as info:
        limiter.acquire([lim])
    time.sleep(0.6)  # the slot was 0.2 s away: now well past it
    claim(info.value.slot)
    limiter.acquire([lim])  # a fresh slot (the bucket has refilled), not the stale one
    with pytest.raises(RateLimited):
        limiter.acquire([lim])


def test_tokens_reserve_estimate_and_settle(redis_client: Any, namespace: str) -> None:
    limiter = RateLimiter(redis_client, namespace, max_wait_s=0.0)
    reqs, toks = parse_limits({"rpm": 6000, "tpm": 60_000, "token_burst": 1000}, "model:t")
    assert limiter.try_acquire([reqs, toks], tokens=900)[0]
    assert not limiter.try_acquire([reqs, toks], tokens=500)[0]  # 100 left
    limiter.settle([reqs, toks], estimated=900, actual=300)  # refund 600
    assert limiter.try_acquire([reqs, toks], tokens=500)[0]
    key = keys.ratelimit_bucket(namespace, "model:t", "tokens")
    assert 0 < redis_client.pttl(key) <= 3000


def test_buckets_are_shared_by_limiters(redis_client: Any, namespace: str) -> None:
    a = RateLimiter(redis_client, namespace, max_wait_s=0.0, jitter_s=0.0)
    b = RateLimiter(redis_client, namespace, max_wait_s=0.0, jitter_s=0.0)
    lim = Limit("model:shared", "requests", rate=1.0, burst=2.0)
    assert a.try_acquire([lim])[0] and b.try_acquire([lim])[0]
    ok, wait = a.try_acquire([lim])
    assert not ok and 0.8 < wait <= 1.0


@pytest.fixture
def cache(redis_client: Any, namespace: str) -> LMCache:
    return LMCache(redis_client, namespace, ttl_s=60, max_entries=3)


def _entry(text: str) -> dict[str, Any]:
    return {"model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": text}}],
            "usage": {"total_tokens": 3}}


def test_cache_hit_miss_and_counters(cache: LMCache, redis_client: Any, namespace: str) -> None:
    assert cache.get("d1") is None
    cache.put("d1", _entry("one"))
    assert cache.get("d1") == _entry("one")
    assert cache.get("d1") is not None
    stats = cache_stats(redis_client, namespace)
    assert (stats["hits"], stats["misses"], stats["stores"], stats["entries"]) == (2, 1, 1, 1)
    raw = redis_client.get(keys.lm_cache_entry(namespace, "d1"))
    assert raw.startswith(b"{")  # JSON, never a pickle


def test_cache_evicts_the_oldest_past_the_bound(cache: LMCache, redis_client: Any, namespace: str) -> None:
    for i in range(5):
        cache.put(f"d{i}", _entry(str(i)))
        time.sleep(0.002)
    assert [cache.get(f"d{i}") is not None for i in range(5)] == [False, False, True, True, True]
    stats = cache_stats(redis_client, namespace)
    assert stats["evictions"] == 2 and stats["entries"] == 3


def test_cache_entries_expire(redis_client: Any, namespace: str) -> None:
    short = LMCache(redis_client, namespace, ttl_s=0.2, max_entries=10)
    short.put("gone", _entry("x"))
    assert short.get("gone") is not None
    time.sleep(0.3)
    assert short.get("gone") is None
    short.put("next", _entry("y"))  # a store prunes expired index entries
    assert cache_stats(redis_client, namespace)["entries"] == 1


def test_usage_aggregates_per_session_signature_and_model(redis_client: Any, namespace: str) -> None:
    ledger = UsageLedger(redis_client, namespace, flush_s=60)
    for i in range(4):
        scope = TaskUsage("qa", "s1" if i % 2 else "s2")
        scope.calls.append(("openai/gpt-4o-mini", {"prompt_tokens": 100, "completion_tokens": 10}, False))
        ledger.finish(scope, None, "qa", scope.session)
    other = TaskUsage("classify", None)
    other.calls += [("openai/mock", {"prompt_tokens": 7, "completion_tokens": 3}, False), ("openai/mock", {}, True)]
    ledger.finish(other, None, "classify", None)
    ledger.close()
    rows = {(r["signature"], r["model"]): r for r in usage_report(redis_client, namespace)}
    qa = rows[("qa", "openai/gpt-4o-mini")]
    assert (qa["tasks"], qa["lm_calls"], qa["prompt_tokens"], qa["total_tokens"]) == (4, 4, 400, 440)
    assert qa["cost_known"] and qa["cost_usd"] > 0
    cl = rows[("classify", "openai/mock")]
    assert (cl["tasks"], cl["lm_calls"], cl["cache_hits"], cl["cost_usd"], cl["cost_known"]) == (1, 2, 1, 0.0, False)
    (s1,) = usage_report(redis_client, namespace, "s1")
    assert s1["tasks"] == 2 and s1["total_tokens"] == 220
    assert usage_totals(redis_client, namespace)["tasks"] == 5
    data = collect_usage(redis_client, namespace, "s1")
    assert data["totals"]["tasks"] == 2 and data["lm_cache"]["hits"] == 0


def test_usage_flushes_in_the_background(redis_client: Any, namespace: str) -> None:
    ledger = UsageLedger(redis_client, namespace, flush_s=0.1)
    scope = TaskUsage("qa", None)
    scope.calls.append(("m", {"prompt_tokens": 1, "completion_tokens": 1}, False))
    ledger.finish(scope, None, "qa", None)
    deadline = time.time() + 3
    while time.time() < deadline and not usage_report(redis_client, namespace):
        time.sleep(0.05)
    assert usage_report(redis_client, namespace)[0]["total_tokens"] == 2
    ledger.close()


# -- through Celery: a full bucket re-queues the task instead of failing it ---------------------------
@pytest.fixture
def limited_app(settings: Any) -> Iterator[Any]:
    from celery.contrib.testing.worker import start_worker

    from dspex_tasks.worker.app import create_worker_app

    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str", name="slowqa", register=False,
                      rate_limit={"rps": 4, "burst": 1}, cache=True))
    tight = settings.model_copy(update={"rate_limit_max_wait_s": 0.2, "task_max_retries": 0})
    app = create_worker_app(tight, signatures=reg, import_modules=False)
    with start_worker(app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=10):
        app.runtime  # noqa: B018
        yield app
    app.reset_runtime()


def test_full_bucket_requeues_without_failing(limited_app: Any, settings: Any, redis_client: Any) -> None:
    from dspex_tasks.client import Client

    client = Client(settings=settings)
    try:
        t0 = time.monotonic()
        jobs = [client.submit("slowqa", {"question": f"q{i}"}, session="rl") for i in range(10)]
        results = [job.get(timeout=60) for job in jobs]
        elapsed = time.monotonic() - t0
        # every task succeeded although task_max_retries=0, and the limit held: 1 + 4/s
        assert len(results) == 10 and elapsed >= (10 - 1) / 4 - 0.3
        again = client.submit("slowqa", {"question": "q3"}, session="rl").get(timeout=30)
        assert again.usage["cache_hits"] == 1 and again.usage["total_tokens"] == 0
    finally:
        client.close()
    limited_app.runtime.ledger.flush()
    (row,) = usage_report(redis_client, settings.namespace, "rl")
    assert row["tasks"] == 11 and row["cache_hits"] == 1
