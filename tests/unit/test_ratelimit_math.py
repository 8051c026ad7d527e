"""Rate-limit arithmetic: parsing, the GCRA window bound, re-queue budgets (no Redis)."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspex_tasks.errors import LMError
from dspex_tasks.lm.ratelimit import (
    REQUEUE_HEADER,
    SLOT_HEADER,
    Limit,
    RateLimited,
    estimate_tokens,
    gcra_reserve,
    lm_retries,
    parse_limits,
    requeue,
    requeue_countdown,
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


def test_countdown_spreads_but_never_shortens() -> None:
    rng = random.Random(7)
    values = [requeue_countdown(2.0, rng) for _ in range(200)]
    assert min(values) >= 2.0 and max(values) <= 3.2 and len({round(v, 3) for v in values}) > 100


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


def test_requeue_has_its_own_budget() -> None:
    task = _Task(retries=5, headers={REQUEUE_HEADER: 4, "trace": "x"})
    assert requeues(task.request) == 4 and lm_retries(task.request) == 1
    out = requeue(task, RateLimited(1.5, "full"), max_requeues=10, max_retries=1)
    assert isinstance(out, RuntimeError)
    assert task.calls == [{"countdown": 1.5, "headers": {REQUEUE_HEADER: 5, SLOT_HEADER: None, "trace": "x"},
                           "throw": False}]
    slot = {"key": "k", "at": 123.0}
    requeue(task, RateLimited(2.0, "full", False, slot), max_requeues=10, max_retries=1)
    assert task.calls[-1]["headers"][SLOT_HEADER] == slot
    spent = _Task(retries=10, headers={REQUEUE_HEADER: 10})
    assert isinstance(requeue(spent, RateLimited(1.0), max_requeues=10, max_retries=3), LMError)


def test_provider_wait_spends_the_lm_retry_budget() -> None:
    task = _Task(retries=2, headers={REQUEUE_HEADER: 1})
    requeue(task, RateLimited(30.0, "429", True), max_requeues=10, max_retries=3)
    assert task.calls[0]["headers"][REQUEUE_HEADER] == 1  # not counted as a fleet re-queue
    done = _Task(retries=4, headers={REQUEUE_HEADER: 1})
    err = requeue(done, RateLimited(30.0, "429", True), max_requeues=10, max_retries=3)
    assert isinstance(err, LMError) and "(LMRateLimitError)" in err.message and not done.calls


def test_rate_limited_round_trips_its_args() -> None:
    exc = RateLimited(2.5, "full", True, {"key": "k", "at": 1.0})
    again = RateLimited(*exc.args)
    assert (again.countdown_s, again.message, again.provider, again.slot) == (2.5, "full", True, {"key": "k", "at": 1.0})
    assert requeues(SimpleNamespace(headers=None, dspex_rate_limited="3")) == 3
