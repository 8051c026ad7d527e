"""Rate-limit arithmetic: parsing, the GCRA window bound, re-queue budgets (no Redis)."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspex_tasks.errors import LMError, LMRateLimitError
from dspex_tasks.lm.ratelimit import (
    DEFAULT_MAX_COUNTDOWN_S,
    DEFAULT_MAX_QUEUE_S,
    REQUEUE_HEADER,
    SLOT_HEADER,
    Limit,
    RateLimited,
    estimate_tokens,
    gcra_reserve,
    lm_retries,
    parse_limits,
    requeue,
    requeues,
)
from dspex_tasks.settings import Settings

pytestmark = pytest.mark.unit


def test_parse_rpm_tpm_and_bursts() -> None:
    reqs, toks = parse_limits({"rpm": 600, "tpm": 120_000, "burst": 5, "token_burst": 4000}, "model:m")
    assert (reqs.unit, reqs.rate, reqs.burst) == ("requests", 10.0, 5.0)
    assert (toks.unit, toks.rate, toks.burst) == ("tokens", 2000.0, 4000.0)
    assert reqs.interval_ms == 100.0 and reqs.tolerance_ms == 500.0
    assert reqs.max_in_window(60) == 605


def test_parse_defaults_burst_to_one_seconds_worth() -> None:
    (slow,) = parse_limits({"rpm": 30}, "sig:qa")
    (fast,) = parse_limits({"rps": 12.5}, "sig:qa")
    assert slow.burst == 1.0 and fast.burst == 12.0


@pytest.mark.parametrize("spec, needle", [
    ({"rpmm": 5}, "unknown rate-limit key"),
    ({"rpm": 0}, "must be > 0"),
    ({"rpm": "60"}, "must be a number"),
    ({"rpm": 60, "rps": 1}, "twice"),
    ({"burst": 3}, "without a requests rate"),
    ({"rps": 5, "burst": 0.5}, ">= 1"),
    ([1, 2], "must be an object"),
])
def test_parse_rejects_with_a_reason(spec: Any, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_limits(spec, "model:m")


def test_settings_validate_rate_limits() -> None:
    assert Settings(rate_limits={"openai/x": {"rpm": 60}}).rate_limits == {"openai/x": {"rpm": 60}}
    with pytest.raises(ValueError, match="unknown rate-limit key"):
        Settings(rate_limits={"openai/x": {"rpn": 60}})


def test_burst_then_spaced() -> None:
    lim = Limit("sig:s", "requests", rate=10.0, burst=3.0)
    tats: dict[str, float] = {}
    waits = [gcra_reserve(tats, 0.0, [("b", lim, 1.0)], 10_000)[1] for _ in range(6)]
    assert waits == pytest.approx([0, 0, 0, 100, 200, 300])


def test_reject_reserves_nothing() -> None:
    lim = Limit("sig:s", "requests", rate=1.0, burst=1.0)
    tats: dict[str, float] = {}
    assert gcra_reserve(tats, 0.0, [("b", lim, 1.0)], 0) == (True, 0.0)
    before = dict(tats)
    ok, wait = gcra_reserve(tats, 10.0, [("b", lim, 1.0)], 500)
    assert not ok and wait == pytest.approx(990.0) and tats == before


def test_all_buckets_or_none() -> None:
    reqs = Limit("m", "requests", rate=100.0, burst=100.0)
    toks = Limit("m", "tokens", rate=10.0, burst=100.0)
    tats: dict[str, float] = {}
    assert gcra_reserve(tats, 0.0, [("r", reqs, 1), ("t", toks, 100)], 0)[0]
    ok, wait = gcra_reserve(tats, 0.0, [("r", reqs, 1), ("t", toks, 50)], 0)
    assert not ok and wait == pytest.approx(5000.0)  # the token bucket decides; the request bucket is untouched
    assert tats["r"] == pytest.approx(10.0)


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(1, 50), burst=st.integers(1, 8), window=st.floats(0.05, 3.0),
       arrivals=st.lists(st.floats(0, 5000), min_size=1, max_size=150), max_wait=st.floats(0, 2000))
def test_any_window_admits_at_most_burst_plus_rate_times_window(rate: float, burst: int, window: float,
                                                                 arrivals: list[float], max_wait: float) -> None:
    lim = Limit("m", "requests", rate=rate, burst=float(burst))
    tats: dict[str, float] = {}
    sends = []
    for t in sorted(arrivals):
        ok, wait = gcra_reserve(tats, t, [("b", lim, 1.0)], max_wait)
        if ok:
            assert wait <= max_wait
            sends.append(t + wait)
    sends.sort()
    width = window * 1000
    for i, start in enumerate(sends):
        inside = sum(1 for s in sends[i:] if s < start + width)
        assert inside <= lim.max_in_window(window) + 1e-9


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(1, 50), burst=st.integers(1, 8), window=st.floats(0.05, 3.0), seed=st.integers(0, 2**16),
       arrivals=st.lists(st.floats(0, 5000), min_size=1, max_size=150))
def test_jitter_reserve_keeps_the_bound_at_the_provider(rate: float, burst: int, window: float, seed: int,
                                                         arrivals: list[float]) -> None:
    # Each request reaches the provider 0..100 ms after its slot; the reserve keeps windows within bounds
    lim = Limit("m", "requests", rate=rate, burst=float(burst))
    if burst < rate * 0.1:
        return  # the reserve cannot exceed the burst (documented)
    rng = random.Random(seed)
    tats: dict[str, float] = {}
    seen = []
    for t in sorted(arrivals):
        ok, wait = gcra_reserve(tats, t, [("b", lim, 1.0)], 1000, jitter_ms=100)
        if ok:
            seen.append(t + wait + rng.uniform(0, 100))
    seen.sort()
    width = window * 1000
    for i, start in enumerate(seen):
        assert sum(1 for s in seen[i:] if s < start + width) <= lim.max_in_window(window) + 1e-9


def test_estimate_tokens() -> None:
    msgs = [{"role": "user", "content": "x" * 400}]
    assert estimate_tokens(None, msgs, None) == 100 + 256
    assert estimate_tokens("y" * 40, None, 50) == 10 + 50


class _Task:
    def __init__(self, retries: int, headers: dict[str, Any] | None) -> None:
        self.request = SimpleNamespace(retries=retries, headers=headers)
        self.calls: list[dict[str, Any]] = []

    def retry(self, **kwargs: Any) -> BaseException:
        self.calls.append(kwargs)
        return RuntimeError("retry")


def test_requeue_has_its_own_budget_and_carries_the_slot() -> None:
    task = _Task(retries=5, headers={REQUEUE_HEADER: 4, "trace": "x"})
    assert requeues(task.request) == 4 and lm_retries(task.request) == 1
    before = time.time()
    out = requeue(task, RateLimited(1.5, "full"), max_retries=1)
    assert isinstance(out, RuntimeError)
    (call,) = task.calls
    assert call["countdown"] == 1.5 and call["throw"] is False and call["headers"]["trace"] == "x"
    assert call["headers"][REQUEUE_HEADER] == 5
    assert before <= call["headers"][SLOT_HEADER]["since"] <= time.time()  # when a full bucket first turned it away
    slot = {"key": "k", "at": 123.0, "call": 0}
    again = _Task(retries=6, headers=call["headers"])
    requeue(again, RateLimited(2.0, "full", False, slot), max_retries=1)
    assert again.calls[-1]["headers"][SLOT_HEADER] == {**slot, "since": call["headers"][SLOT_HEADER]["since"]}


def test_the_fleet_wait_is_bounded_by_time_not_by_count() -> None:
    # Given a task re-queued 10,000 times (the old count budget was 200), first turned away 2 hours ago
    since = time.time() - 7200
    task = _Task(retries=10_000, headers={REQUEUE_HEADER: 10_000, SLOT_HEADER: {"since": since}})
    # Then a slot the limiter reserved is still waited for (however long the task was away: its worker may
    # have died holding it), with the default bound of an hour on how far ahead a slot may be
    requeue(task, RateLimited(30.0, "full", False, {"key": "k", "at": 1.0}), max_retries=0)
    assert task.calls[-1]["countdown"] == 30.0 and task.calls[-1]["headers"][SLOT_HEADER]["since"] == since
    # But no slot within the bound (the limiter reserved nothing) fails it, typed, naming the setting
    err = requeue(task, RateLimited(3601.0, "rate limit sig:x requests full"), max_retries=0)
    assert type(err) is LMRateLimitError and len(task.calls) == 1
    assert "DSPEX_RATE_LIMIT_MAX_QUEUE_S=3600s" in err.message and "sig:x" in err.message and "7200s" in err.message
    err = requeue(task, RateLimited(40.0, "full"), max_retries=0, max_queue_s=30)
    assert type(err) is LMRateLimitError and "DSPEX_RATE_LIMIT_MAX_QUEUE_S=30s" in err.message
    assert DEFAULT_MAX_QUEUE_S == Settings().rate_limit_max_queue_s == 3600


def test_a_countdown_is_capped_by_the_setting_and_half_the_visibility_timeout() -> None:
    task = _Task(retries=0, headers={})
    slot = {"key": "k", "at": 1.0}
    requeue(task, RateLimited(2500.0, "full", False, slot), max_retries=0)
    requeue(task, RateLimited(2500.0, "full", False, slot), max_retries=0, max_countdown_s=40)
    requeue(task, RateLimited(2500.0, "full", False, slot), max_retries=0, visibility_timeout_s=600)
    requeue(task, RateLimited(20.0, "full", False, slot), max_retries=0, visibility_timeout_s=600)
    assert [c["countdown"] for c in task.calls] == [DEFAULT_MAX_COUNTDOWN_S, 40, 300, 20]
    assert Settings().rate_limit_max_countdown_s == DEFAULT_MAX_COUNTDOWN_S


def test_provider_wait_spends_the_lm_retry_budget() -> None:
    task = _Task(retries=2, headers={REQUEUE_HEADER: 1, SLOT_HEADER: {"since": 5.0}})
    requeue(task, RateLimited(3000.0, "429", True), max_retries=3, max_countdown_s=10)
    assert task.calls[0]["countdown"] == 3000.0  # the provider's wait, not capped (nor timed) as a fleet slot
    assert task.calls[0]["headers"][REQUEUE_HEADER] == 1  # not counted as a fleet re-queue
    assert task.calls[0]["headers"][SLOT_HEADER] == {"since": 5.0}
    done = _Task(retries=4, headers={REQUEUE_HEADER: 1})
    err = requeue(done, RateLimited(30.0, "429", True), max_retries=3)
    assert isinstance(err, LMError) and "(LMRateLimitError)" in err.message and not done.calls


def test_rate_limited_round_trips_its_args() -> None:
    exc = RateLimited(2.5, "full", True, {"key": "k", "at": 1.0})
    again = RateLimited(*exc.args)
    assert (again.countdown_s, again.message, again.provider, again.slot) == (2.5, "full", True, {"key": "k", "at": 1.0})
    assert requeues(SimpleNamespace(headers=None, dspex_rate_limited="3")) == 3
