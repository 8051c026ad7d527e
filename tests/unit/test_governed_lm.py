"""GovernedLM's error policy, fallbacks, routing and usage scope, with fake inner LMs (no Redis, no HTTP)."""

from __future__ import annotations

import collections
from typing import Any

import dspy
import pytest
from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMAuthError,
    LMRateLimitError,
    LMServerError,
    LMTransportError,
)

from dspex_tasks import errors
from dspex_tasks.dsl.signature import SignatureRegistry, signature
from dspex_tasks.errors import ConfigurationError, LMContextLengthExceeded, LMError, LMTimeout, RateLimited
from dspex_tasks.lm.cache import entry_from_response, request_digest
from dspex_tasks.lm.errors import classify, error_class, to_lm_error
from dspex_tasks.lm.governed import GovernedLM, Route, parse_route, plan_lm, retry_delay
from dspex_tasks.lm.usage import UsageLedger, price, task_usage
from dspex_tasks.settings import Settings
from dspex_tasks.testing.mock_lm import MockLM

pytestmark = pytest.mark.unit

MSGS = [{"role": "user", "content": "hello"}]


class FakeLM:
    """Raises the scripted errors in order, then answers."""

    def __init__(self, model: str, errors: list[BaseException] | None = None, forever: BaseException | None = None):
        self.model = model
        self.model_type = "chat"
        self.kwargs = {"temperature": 0.0, "max_tokens": 100, "api_key": "sk-secret"}
        self.errors = list(errors or [])
        self.forever = forever
        self.calls: list[dict[str, Any]] = []

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.forever is not None:
            raise self.forever
        if self.errors:
            raise self.errors.pop(0)
        return {"model": self.model, "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": f"from {self.model}"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def governed(*inners: FakeLM, weights: tuple[float, ...] | None = None, retries: int = 2,
             max_wait_s: float = 1.0) -> tuple[GovernedLM, list[float]]:
    slept: list[float] = []
    route = Route(tuple(i.model for i in inners), weights)
    lm = GovernedLM(route, {i.model: i for i in inners}, retries=retries, backoff_s=0.1, max_wait_s=max_wait_s,
                    sleep=slept.append)
    return lm, slept


def test_server_errors_are_retried_with_backoff_then_served() -> None:
    inner = FakeLM("openai/a", [LMServerError("503", status=503), LMServerError("502", status=502)])
    lm, slept = governed(inner)
    with task_usage("qa", "s1") as spent:
        out = lm.forward(messages=MSGS)
    assert out["choices"][0]["message"]["content"] == "from openai/a"
    assert len(inner.calls) == 3 and len(slept) == 2
    assert 0.08 <= slept[0] <= 0.12 and 0.16 <= slept[1] <= 0.24
    assert spent.served == "openai/a" and spent.calls[0][1]["total_tokens"] == 15


def test_retry_after_is_honoured() -> None:
    inner = FakeLM("openai/a", [LMRateLimitError("429", retry_after=1.0), LMRateLimitError("429", retry_after=1.0)])
    lm, slept = governed(inner)
    lm.forward(messages=MSGS)
    assert slept == [1.0, 1.0] and len(inner.calls) == 3


def test_a_long_retry_after_frees_the_thread() -> None:
    lm, slept = governed(FakeLM("openai/a", forever=LMRateLimitError("429", retry_after=30.0)))
    with pytest.raises(RateLimited) as info:
        lm.forward(messages=MSGS)
    assert info.value.provider and info.value.countdown_s == 30.0 and slept == []


def test_persistent_errors_end_as_a_typed_retryable_lm_error() -> None:
    inner = FakeLM("openai/a", forever=LMServerError("boom", status=503))
    lm, _ = governed(inner)
    with pytest.raises(LMError) as info:
        lm.forward(messages=MSGS)
    assert type(info.value) is errors.LMServerError and "(LMServerError)" in info.value.message
    assert info.value.retryable and len(inner.calls) == 3


def test_a_provider_rate_limit_ends_as_a_retryable_error_carrying_retry_after() -> None:
    inner = FakeLM("openai/a", forever=LMRateLimitError("429", retry_after=0.5))
    lm, _ = governed(inner)
    with pytest.raises(errors.LMRateLimitError) as info:
        lm.forward(messages=MSGS)
    assert info.value.retryable and info.value.retry_after == 0.5


def test_fallback_serves_and_is_named() -> None:
    bad = FakeLM("openai/bad", forever=LMServerError("down", status=503))
    good = FakeLM("anthropic/good")
    lm, _ = governed(bad, good, retries=1)
    with task_usage("qa", None) as spent:
        out = lm.forward(messages=MSGS)
    assert out["model"] == "anthropic/good" and spent.served == "anthropic/good"
    assert len(bad.calls) == 2 and len(good.calls) == 1


def test_timeout_is_not_retried_but_falls_back() -> None:
    err = LMTransportError("read timed out")
    err.__cause__ = TimeoutError("timed out")
    slow = FakeLM("openai/slow", forever=err)
    lm, slept = governed(slow)
    with pytest.raises(LMTimeout):
        lm.forward(messages=MSGS)
    assert len(slow.calls) == 1 and slept == []
    good = FakeLM("openai/good")
    lm2, _ = governed(FakeLM("openai/slow", forever=err), good)
    assert lm2.forward(messages=MSGS)["model"] == "openai/good"


@pytest.mark.parametrize("error, typed", [
    (ContextWindowExceededError(model="m"), LMContextLengthExceeded),
    (LMAuthError("bad key", status=401), errors.LMAuthError),
])
def test_non_retryable_errors_fail_at_once_without_fallback(error: Exception, typed: type[LMError]) -> None:
    first, second = FakeLM("openai/a", forever=error), FakeLM("openai/b")
    lm, _ = governed(first, second)
    with pytest.raises(typed):
        lm.forward(messages=MSGS)
    assert len(first.calls) == 1 and second.calls == []


def test_classify_is_data_driven() -> None:
    assert classify(LMRateLimitError("x")) == "retry" and classify(LMServerError("x")) == "retry"
    assert classify(ContextWindowExceededError()) == "context" and classify(ValueError("x")) == "fatal"
    assert retry_delay(LMRateLimitError("x", retry_after=2.5), 0, 0.5) == 2.5


class RateLimitError(Exception):  # named like LiteLLM's/OpenAI's, which are never imported by the table
    pass


class APIConnectionError(Exception):
    pass


@pytest.mark.parametrize("exc, cls, retryable", [
    (LMRateLimitError("x", retry_after=3.0), errors.LMRateLimitError, True),
    (LMServerError("x", status=502), errors.LMServerError, True),
    (LMTransportError("reset"), errors.LMConnectionError, True),
    (RateLimitError("429"), errors.LMRateLimitError, True),
    (APIConnectionError("refused"), errors.LMConnectionError, True),
    (TimeoutError("slow"), errors.LMTimeout, False),
    (ContextWindowExceededError(model="m"), errors.LMContextLengthExceeded, False),
    (LMAuthError("bad key", status=401), errors.LMAuthError, False),
    (ValueError("odd"), errors.LMError, False),
])
def test_error_classes_decide_retries_not_message_text(exc: Exception, cls: type[LMError], retryable: bool) -> None:
    assert error_class(exc) is cls
    typed = to_lm_error(exc, "a message that names no class at all")
    assert type(typed) is cls and typed.retryable is retryable
    assert typed.retry_after == (3.0 if isinstance(exc, LMRateLimitError) else None)
    # the decision survives the wire: rebuilt from its JSON args, the class and the wait are the same
    back = errors.from_remote(type(typed).__name__, list(typed.args))
    assert type(back) is cls and back.retryable is retryable and back.retry_after == typed.retry_after


def test_weighted_routing_is_deterministic_and_follows_the_weights() -> None:
    a, b = FakeLM("m/a"), FakeLM("m/b")
    lm, _ = governed(a, b, weights=(0.9, 0.1))
    firsts = collections.Counter()
    for i in range(400):
        order = lm.route.order(request_digest(lm.route.key, None, [{"role": "user", "content": str(i)}], {}))
        firsts[order[0]] += 1
        assert set(order) == {"m/a", "m/b"}
    assert 320 <= firsts["m/a"] <= 390
    digest = request_digest(lm.route.key, None, MSGS, {})
    assert lm.route.order(digest) == lm.route.order(digest)


def test_copy_changes_travel_and_secrets_stay_out() -> None:
    inner = FakeLM("openai/a")
    lm, _ = governed(inner)
    assert "api_key" not in lm.kwargs and lm.kwargs["temperature"] == 0.0
    lm.copy(rollout_id=3, temperature=1.0).forward(messages=MSGS, n=1)
    assert inner.calls[-1] == {"rollout_id": 3, "temperature": 1.0, "n": 1}


def test_parse_route() -> None:
    assert parse_route("m1", ["m2", "m1", "m3"]).models == ("m1", "m2", "m3")
    assert parse_route(["a", "b", "a"], ["z"]).models == ("a", "b")
    weighted = parse_route({"a": 9, "b": 1})
    assert weighted.weights == (9.0, 1.0) and weighted.key == "a=9,b=1"
    for bad in ({"a": 0}, [], 3, {"a": True}):
        with pytest.raises(ConfigurationError):
            parse_route(bad)


def test_plan_governs_only_when_needed() -> None:
    mock = Settings()
    assert not plan_lm(mock, "qa", {}).governed
    assert plan_lm(mock, "qa", {"cache": True}).governed
    real = Settings(lm="openai/x", lm_fallbacks="openai/y", rate_limits={"openai/y": {"rpm": 60}})
    plan = plan_lm(real, "qa", {"rate_limit": {"rps": 2}})
    assert plan.route.models == ("openai/x", "openai/y")
    assert [lim.scope for lim in plan.limits["openai/x"]] == ["sig:qa"]
    assert [lim.scope for lim in plan.limits["openai/y"]] == ["model:openai/y", "sig:qa"]
    assert plan_lm(real, "a", {}).key == plan_lm(real, "b", {}).key != plan.key
    with pytest.raises(ConfigurationError, match="rate-limit"):
        plan_lm(real, "qa", {"rate_limit": {"rpx": 1}})
    with pytest.raises(ConfigurationError, match="api_key_env"):
        plan_lm(Settings(lm_endpoints={"m": {"api_key": "sk-x"}}), "qa", {})


def test_through_dspy_predict_errors_keep_their_type() -> None:
    reg = SignatureRegistry()
    sig = signature("question: str -> answer: str", name="g_qa", register=False)
    reg.add(sig)
    inner = MockLM(registry=reg)
    lm = GovernedLM(Route(("mock",)), {"mock": inner})
    with task_usage("g_qa", None) as spent, dspy.context(lm=lm):
        out = dspy.Predict(sig.to_dspy())(question="hi")
    assert isinstance(out.answer, str) and spent.served == "mock/dspex"
    failing = GovernedLM(Route(("x",)), {"x": FakeLM("x", forever=ContextWindowExceededError(model="x"))})
    with pytest.raises(LMContextLengthExceeded), dspy.context(lm=failing):
        dspy.Predict(sig.to_dspy())(question="hi")


def test_digest_ignores_credentials_only() -> None:
    base = request_digest("r", None, MSGS, {"temperature": 0, "api_key": "a", "api_base": "http://x"})
    assert base == request_digest("r", None, MSGS, {"temperature": 0, "api_key": "b", "api_base": "http://y"})
    assert base != request_digest("r", None, MSGS, {"temperature": 0.5})
    assert base != request_digest("r", None, [{"role": "user", "content": "other"}], {"temperature": 0})
    assert base != request_digest("r2", None, MSGS, {"temperature": 0})


def test_cache_entry_is_plain_json() -> None:
    raw = FakeLM("m").forward(messages=MSGS)
    entry = entry_from_response(raw, "m")
    assert entry is not None and entry["choices"][0]["message"]["content"] == "from m"
    assert entry_from_response({"choices": []}, "m") is None
    assert entry_from_response({"choices": [{"message": {"content": object()}}]}, "m") is None


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "gpt-4o-mini", "openai/gpt-4o", "anthropic/claude-haiku-4-5"])
def test_prices_match_litellm_cost_per_token(model: str) -> None:
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    prompt_cost, completion_cost = litellm.cost_per_token(model=model, prompt_tokens=1234, completion_tokens=567)
    assert price(model, 1234, 567) == (pytest.approx(prompt_cost + completion_cost), True)


def test_price_and_ledger_without_redis() -> None:
    cost, known = price("openai/gpt-4o-mini", 1000, 1000)
    assert known and cost > 0
    assert price("openai/no-such-model-here", 1000, 1000) == (0.0, False)
    assert price("mock/dspex", 10, 10) == (0.0, False) and price("azure/gpt-4o-mini-nope", 1, 1) == (0.0, False)
    ledger = UsageLedger(None, "ns")
    with task_usage("qa", "s") as spent:
        spent.calls.append(("openai/gpt-4o-mini", {"prompt_tokens": 100, "completion_tokens": 20}, False))
        spent.calls.append(("openai/gpt-4o-mini", {}, True))
    usage = ledger.finish(spent, None, "qa", "s")
    assert usage["total_tokens"] == 120 and usage["lm_calls"] == 2 and usage["cache_hits"] == 1
    assert usage["cost_known"] and usage["cost_usd"] == pytest.approx(price("openai/gpt-4o-mini", 100, 20)[0])
