"""Layer 2: the rate limiter, the shared LM cache and usage aggregation against a real Redis."""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from dspex_tasks import keys
from dspex_tasks.cli.usage import collect_usage
from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.errors import LMRateLimitError
from dspex_tasks.lm.cache import LMCache, cache_stats
from dspex_tasks.lm.ratelimit import Limit, RateLimited, RateLimiter, claim, claim_from, parse_limits, requeue
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


class _Task:
    """What :func:`requeue` needs of a Celery task: its request, and ``retry`` (recorded, not raised)."""

    def __init__(self, task_id: str, headers: dict[str, Any]) -> None:
        self.request = SimpleNamespace(id=task_id, retries=0, headers=headers)
        self.retried: list[dict[str, Any]] = []

    def retry(self, **kwargs: Any) -> BaseException:
        self.retried.append(kwargs)
        return RuntimeError("retry")


def test_a_task_asking_again_gets_the_same_slot_and_takes_one_unit(redis_client: Any, namespace: str) -> None:
    # Given a 2/s bucket (burst 1) whose burst is taken: the next slot is 0.5 s away
    limiter = RateLimiter(redis_client, namespace, max_wait_s=0.2, jitter_s=0.0)
    (lim,) = parse_limits({"rps": 2, "burst": 1}, "sig:idem")
    bucket = keys.ratelimit_bucket(namespace, "sig:idem", "requests")
    claim(None)
    limiter.acquire([lim])
    # When task t1 reserves it, and its message is delivered a second time (same task id, same first call)
    claim_from(SimpleNamespace(id="t1", headers={}))
    with pytest.raises(RateLimited) as first:
        limiter.acquire([lim])
    tat = float(redis_client.get(bucket))
    claim_from(SimpleNamespace(id="t1", headers={}))
    with pytest.raises(RateLimited) as second:
        limiter.acquire([lim])
    # Then the second delivery is given the same slot, and the bucket holds one unit for both
    slot = first.value.slot
    assert slot is not None and second.value.slot is not None and slot["call"] == second.value.slot["call"] == 0
    assert second.value.slot["at"] == pytest.approx(slot["at"], abs=0.01)
    assert float(redis_client.get(bucket)) == tat
    # And its next LM call is another call: a slot of its own, one emission interval later
    with pytest.raises(RateLimited) as next_call:
        limiter.acquire([lim])
    assert next_call.value.slot is not None and next_call.value.slot["call"] == 1
    assert next_call.value.slot["at"] == pytest.approx(slot["at"] + 500, abs=2)
    # When both copies come back for the slot, it is sent once: the first redeems it in-thread
    time.sleep(first.value.countdown_s)
    claim_from(SimpleNamespace(id="t1", headers={}))
    assert 0 <= limiter.acquire([lim]) <= 0.2
    tat = float(redis_client.get(bucket))
    claim_from(SimpleNamespace(id="t1", headers={}))
    with pytest.raises(RateLimited) as duplicate:
        limiter.acquire([lim])  # the other copy sends too: it needs a unit of its own, further back
    assert duplicate.value.slot is not None and duplicate.value.slot["at"] > slot["at"] + 900
    assert float(redis_client.get(bucket)) == pytest.approx(tat + 500)
    claim(None)


def test_no_slot_is_reserved_past_the_tasks_wait_budget(redis_client: Any, namespace: str) -> None:
    limiter = RateLimiter(redis_client, namespace, max_wait_s=0.0, jitter_s=0.0)
    (lim,) = parse_limits({"rps": 1, "burst": 1}, "sig:budget")
    bucket = keys.ratelimit_bucket(namespace, "sig:budget", "requests")
    limiter.acquire([lim])
    tat = redis_client.get(bucket)
    # Given a task allowed to wait 0.5 s, when the next slot is 1 s away
    task = _Task("t-budget", {})
    claim_from(task.request, max_queue_s=0.5)
    with pytest.raises(RateLimited) as info:
        limiter.acquire([lim])
    claim(None)
    # Then nothing is reserved, and the task fails typed, naming the setting
    assert info.value.slot is None and redis_client.get(bucket) == tat
    err = requeue(task, info.value, max_retries=3, max_queue_s=0.5)
    assert type(err) is LMRateLimitError and "DSPEX_RATE_LIMIT_MAX_QUEUE_S=0.5s" in err.message
    assert task.retried == []


@pytest.mark.parametrize("cap_s", [60.0, 0.5])
def test_a_backlog_far_beyond_the_wait_requeues_each_task_a_bounded_number_of_times(
        redis_client: Any, namespace: str, cap_s: float) -> None:
    # Given 150 tasks arriving at once on a 50/s bucket (burst 6): a 2.9 s backlog, 29 times the 0.1 s
    # in-thread wait; each re-queue's countdown is capped at cap_s (60 s: no cap here; 0.5 s: six per backlog)
    rate, burst, n, max_wait = 50.0, 6, 150, 0.1
    limiter = RateLimiter(redis_client, namespace, max_wait_s=max_wait, sleep=lambda s: None)
    (lim,) = parse_limits({"rps": rate, "burst": burst}, "sig:backlog")
    start = time.monotonic()
    due: list[tuple[float, int, dict[str, Any]]] = [(start, i, {}) for i in range(n)]
    requeued = dict.fromkeys(range(n), 0)
    sends: dict[int, float] = {}
    waits: list[float] = []
    # When each task runs at its due time, and re-queues itself as a worker would (requeue's countdown)
    while due:
        at, i, headers = heapq.heappop(due)
        time.sleep(max(at - time.monotonic(), 0.0))
        task = _Task(f"task-{i}", headers)
        claim_from(task.request, max_queue_s=60)
        try:
            waited = limiter.acquire([lim], what="backlog")
        except RateLimited as exc:
            assert exc.slot is not None  # every task has its slot, however far back
            requeue(task, exc, max_retries=0, max_countdown_s=cap_s)
            (retry,) = task.retried
            requeued[i] += 1
            heapq.heappush(due, (time.monotonic() + retry["countdown"], i, retry["headers"]))
            continue
        assert i not in sends
        sends[i] = time.monotonic() + waited
        if requeued[i]:
            waits.append(waited)
    claim(None)
    backlog_s = (n - burst) / rate
    # Then every task was sent, once, never more than burst + rate x W in any window W
    assert len(sends) == n
    assert _max_in_window(list(sends.values()), 0.5) <= lim.max_in_window(0.5) + 1
    assert max(sends.values()) - start >= backlog_s - 0.1
    # And each was re-queued a bounded number of times, whatever the backlog: once, or once per cap_s of
    # wait; its last countdown landed at its slot (a short in-thread wait, never late or early)
    assert max(requeued.values()) <= math.ceil(min(backlog_s, 60) / cap_s)
    assert sum(requeued.values()) >= n - 10
    assert all(0 <= w <= max_wait for w in waits)
    print(f"\nbacklog {backlog_s:.1f}s, countdown cap {cap_s}s: re-queues per task max {max(requeued.values())}, "
          f"mean {sum(requeued.values()) / n:.2f}; in-thread wait at the slot max {max(waits) * 1000:.0f} ms")


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
    from dspex_tasks.testing.plugin import in_process_worker
    from dspex_tasks.worker.app import create_worker_app

    reg = SignatureRegistry()
    reg.add(signature("question: str -> answer: str", name="slowqa", register=False,
                      rate_limit={"rps": 4, "burst": 1}, cache=True))
    # re-queue count budget 0 (it no longer bounds anything) and countdowns capped at 0.5 s (several re-queues each)
    tight = settings.model_copy(update={"rate_limit_max_wait_s": 0.2, "task_max_retries": 0,
                                        "rate_limit_max_requeues": 0, "rate_limit_max_countdown_s": 0.5})
    app = create_worker_app(tight, signatures=reg, import_modules=False)
    with in_process_worker(app):
        yield app


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


def test_usage_is_kept_per_hour_for_charts_over_time(redis_client: Any, namespace: str) -> None:
    from dspex_tasks import keys
    from dspex_tasks.cli.usage import collect_usage
    from dspex_tasks.lm.usage import usage_series

    ledger = UsageLedger(redis_client, namespace, flush_s=60, history_s=3 * 86_400)
    for session in ("h1", "h1", "h2"):
        scope = TaskUsage("qa", session)
        scope.calls.append(("openai/gpt-4o-mini", {"prompt_tokens": 10, "completion_tokens": 5}, False))
        ledger.finish(scope, None, "qa", session)
    ledger.close()
    now = time.time()
    series = usage_series(redis_client, namespace, hours=24, now=now)
    assert len(series) == 24 and series[-1]["hour"] == int(now) // 3600 * 3600
    used = [b for b in series if b["rows"]]  # one flush: one hour (this one, or the last if it just turned)
    assert len(used) == 1 and used[0]["hour"] >= series[-2]["hour"]
    (row,) = used[0]["rows"]
    assert (row["tasks"], row["total_tokens"]) == (3, 45) and row["cost_usd"] > 0
    (h1,) = [r for b in usage_series(redis_client, namespace, "h1", hours=2, now=now) for r in b["rows"]]
    assert (h1["tasks"], h1["total_tokens"]) == (2, 30)
    ttl = redis_client.ttl(keys.usage_hour(namespace, used[0]["hour"] // 3600))
    assert 0 < ttl <= 3 * 86_400
    hourly = collect_usage(redis_client, namespace, "h2", hours=2)["hourly"]
    assert sum(h["total_tokens"] for h in hourly) == 15 and len(hourly) == 2
    assert all(h["hour"].endswith(":00Z") for h in hourly)
    assert [list(h["models"]) for h in hourly if h["models"]] == [["openai/gpt-4o-mini"]]
